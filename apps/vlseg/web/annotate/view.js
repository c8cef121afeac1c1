// The image with its two overlays: three stacked canvases at the image's own resolution (one canvas pixel = one image
// pixel, so the overlays can be read back exactly), scaled on screen by CSS. Opacity and visibility are CSS only.

// Heat-map colours: dark (certain, 0) -> purple -> red -> orange -> pale yellow (uncertain, 1).
const STOPS = [[0, [0, 0, 4]], [0.25, [87, 16, 110]], [0.5, [188, 55, 84]], [0.75, [249, 142, 9]],
               [1, [252, 255, 164]]];

/** 256 colours: entry round(u * 255) is the colour of uncertainty u. */
export const LUT = Array.from({length: 256}, (_, i) => {
  const t = i / 255;
  let j = 1;
  while (j < STOPS.length - 1 && t > STOPS[j][0]) j++;
  const [t0, c0] = STOPS[j - 1], [t1, c1] = STOPS[j];
  const f = (t - t0) / (t1 - t0);
  return c0.map((v, k) => Math.round(v + (c1[k] - v) * f));
});

// mask colours by label value (1: the prompt's mask; 2, 3...: class ids of labels saved by other viewers)
const PALETTE = [[0, 0, 0], [0, 230, 118], [41, 121, 255], [255, 64, 129], [255, 214, 0], [0, 229, 255]];
export const maskColour = (v) => PALETTE[v % PALETTE.length] || PALETTE[1];

export class View {
  constructor(stage) {
    this.stage = stage;
    this.layers = {};
    for (const name of ["image", "heat", "mask"]) {
      this.layers[name] = stage.querySelector(`#${name}-layer`);
      this.layers[name].getContext("2d", {willReadFrequently: true});
    }
    this.width = 0;
    this.height = 0;
    this.zoom = 0;  // 0: fit
  }

  ctx(name) { return this.layers[name].getContext("2d", {willReadFrequently: true}); }

  setSize(width, height) {
    this.width = width;
    this.height = height;
    for (const c of Object.values(this.layers)) { c.width = width; c.height = height; }
    this.fit();
  }

  /** Scale the canvases on screen: `zoom` x, or (0) as large as the stage allows. */
  fit() {
    if (!this.width) return;
    const box = this.stage.getBoundingClientRect();
    const fit = Math.max(0.1, Math.min((box.width - 20) / this.width, (box.height - 20) / this.height));
    const s = this.zoom || fit;
    for (const c of Object.values(this.layers)) {
      c.style.width = `${Math.round(this.width * s)}px`;
      c.style.height = `${Math.round(this.height * s)}px`;
    }
  }

  drawBitmap(bitmap) {
    this.ctx("image").drawImage(bitmap, 0, 0);
  }

  drawGrey(u8) {  // one slice, row-major
    const img = new ImageData(this.width, this.height);
    for (let i = 0; i < u8.length; i++) {
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = u8[i];
      img.data[4 * i + 3] = 255;
    }
    this.ctx("image").putImageData(img, 0, 0);
  }

  drawMask(slice) {  // label values, row-major; 0 = transparent
    const img = new ImageData(this.width, this.height);
    for (let i = 0; i < slice.length; i++) {
      if (!slice[i]) continue;
      const [r, g, b] = maskColour(slice[i]);
      img.data.set([r, g, b, 255], 4 * i);
    }
    this.ctx("mask").putImageData(img, 0, 0);
  }

  drawHeat(slice) {  // uncertainty in [0, 1], row-major; null = no map
    const img = new ImageData(this.width, this.height);
    if (slice) {
      for (let i = 0; i < slice.length; i++) {
        const [r, g, b] = LUT[Math.min(255, Math.max(0, Math.round(slice[i] * 255)))];
        img.data.set([r, g, b, 255], 4 * i);
      }
    }
    this.ctx("heat").putImageData(img, 0, 0);
  }

  setOpacity(name, value) { this.layers[name].style.opacity = String(value); }
  setVisible(name, on) { this.layers[name].style.visibility = on ? "visible" : "hidden"; }

  /** Image pixel {r, c} under a pointer event, or null outside the image. */
  pixelAt(event) {
    const box = this.layers.mask.getBoundingClientRect();
    const c = Math.floor((event.clientX - box.left) / box.width * this.width);
    const r = Math.floor((event.clientY - box.top) / box.height * this.height);
    return r >= 0 && c >= 0 && r < this.height && c < this.width ? {r, c} : null;
  }
}

/** The colour bar: LUT from 0 (left) to 1 (right); the LUT is also in data-lut (JSON) for tests and tools. */
export function drawColourBar(canvas) {
  canvas.width = 256;
  canvas.height = 1;
  const img = new ImageData(256, 1);
  LUT.forEach(([r, g, b], i) => img.data.set([r, g, b, 255], 4 * i));
  canvas.getContext("2d").putImageData(img, 0, 0);
  canvas.dataset.lut = JSON.stringify(LUT);
}
