// Array layouts and the grey window of volumes.
//
// The page keeps every image, mask and map as "stacks": slice k, row r, column c at k*H*W + r*W + c (a 2D image is a
// stack of one slice). A NIfTI volume (x fastest) is cut as the app cuts it (README "Volumes"): slice vol[:, :, k],
// rows = array axis 0, so H = nx and W = ny.

/** NIfTI order (x fastest; dims [nx, ny, nz]) -> stack order, as `Type`. */
export function fromNifti(dims, data, Type = Float32Array) {
  const [nx, ny, nz] = dims;
  const out = new Type(nx * ny * nz);
  for (let k = 0; k < nz; k++)
    for (let c = 0; c < ny; c++) {
      const src = c * nx + k * nx * ny, dst = k * nx * ny + c;
      for (let r = 0; r < nx; r++) out[dst + r * ny] = data[src + r];
    }
  return out;
}

/** Stack order -> NIfTI order (x fastest), as Uint8Array (labels). */
export function toNifti(dims, stack) {
  const [nx, ny, nz] = dims;
  const out = new Uint8Array(nx * ny * nz);
  for (let k = 0; k < nz; k++)
    for (let c = 0; c < ny; c++) {
      const dst = c * nx + k * nx * ny, src = k * nx * ny + c;
      for (let r = 0; r < nx; r++) out[dst + r] = stack[src + r * ny];
    }
  return out;
}

/** A C-order array of shape [H, W] or [H, W, D] (numpy's layout of the app's maps) -> stack order. */
export function fromNumpy(shape, data) {
  if (shape.length === 2) return data;
  const [h, w, d] = shape;
  const out = new Float32Array(h * w * d);
  for (let r = 0; r < h; r++)
    for (let c = 0; c < w; c++)
      for (let k = 0; k < d; k++) out[k * h * w + r * w + c] = data[(r * w + c) * d + k];
  return out;
}

function percentile(sorted, q) {  // numpy's default (linear interpolation between closest ranks)
  const pos = (sorted.length - 1) * q / 100;
  const lo = Math.floor(pos), hi = Math.min(lo + 1, sorted.length - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

/** The 0..255 window the app gives the 2D bundles (apps/vlseg/lib/imageio.py `window_to_uint8`): integer volumes
 * within 0..255 as they are, anything else linearly from its 0.5th..99.5th percentile, one window per volume
 * (percentiles of at most `sample` evenly spaced voxels: exact up to that size, close enough beyond it). */
export function windowToU8(data, sample = 1 << 20) {
  const out = new Uint8Array(data.length);
  let inRange = true;
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    if (v < 0 || v > 255 || v !== Math.floor(v)) { inRange = false; break; }
  }
  if (inRange) { out.set(data); return out; }
  const step = Math.max(1, Math.floor(data.length / sample));
  const sorted = (step === 1 ? Float32Array.from(data) : Float32Array.from({length: Math.ceil(data.length / step)},
                                                                           (_, i) => data[i * step])).sort();
  const lo = percentile(sorted, 0.5);
  let hi = percentile(sorted, 99.5);
  if (hi <= lo) hi = lo + 1;
  const s = 255 / (hi - lo);
  for (let i = 0; i < data.length; i++) out[i] = Math.min(255, Math.max(0, Math.round((data[i] - lo) * s)));
  return out;
}
