// Mask editing on one slice (row-major Uint8Array, width x height): brush / eraser discs along a stroke, flood fill,
// and an undo stack of slice snapshots.

/** Set a disc of `radius` pixels around (r, c) to `value`; returns the number of pixels changed. */
export function paintDisc(mask, width, height, r, c, radius, value) {
  let changed = 0;
  const rr = radius * radius;
  for (let y = Math.max(0, Math.ceil(r - radius)); y <= Math.min(height - 1, Math.floor(r + radius)); y++) {
    for (let x = Math.max(0, Math.ceil(c - radius)); x <= Math.min(width - 1, Math.floor(c + radius)); x++) {
      const i = y * width + x;
      if ((y - r) ** 2 + (x - c) ** 2 <= rr && mask[i] !== value) { mask[i] = value; changed++; }
    }
  }
  return changed;
}

/** Discs along the segment (r0, c0) -> (r1, c1), one per pixel step. */
export function paintLine(mask, width, height, r0, c0, r1, c1, radius, value) {
  const steps = Math.max(1, Math.ceil(Math.hypot(r1 - r0, c1 - c0)));
  let changed = 0;
  for (let s = 0; s <= steps; s++) {
    const t = s / steps;
    changed += paintDisc(mask, width, height, r0 + (r1 - r0) * t, c0 + (c1 - c0) * t, radius, value);
  }
  return changed;
}

/** Fill the 4-connected region of equal value around (r, c) with `value` (e.g. a hole inside the mask); returns
 * the number of pixels changed. */
export function floodFill(mask, width, height, r, c, value) {
  const start = r * width + c;
  const from = mask[start];
  if (from === value) return 0;
  const stack = [start];
  let changed = 0;
  while (stack.length) {
    const i = stack.pop();
    if (mask[i] !== from) continue;
    mask[i] = value;
    changed++;
    const y = Math.floor(i / width), x = i - y * width;
    if (x > 0) stack.push(i - 1);
    if (x < width - 1) stack.push(i + 1);
    if (y > 0) stack.push(i - width);
    if (y < height - 1) stack.push(i + width);
  }
  return changed;
}

/** Snapshots of the whole mask stack before each change (a stroke, a fill, a new segmentation): at most `limit`
 * of them and at most `maxBytes` in all (large volumes keep fewer steps). */
export class Undo {
  constructor(limit = 30, maxBytes = 256 << 20) { this.limit = limit; this.maxBytes = maxBytes; this.items = []; }
  push(mask) {
    this.items.push(mask.slice());
    const keep = Math.max(1, Math.min(this.limit, Math.floor(this.maxBytes / Math.max(1, mask.length))));
    while (this.items.length > keep) this.items.shift();
  }
  pop() { return this.items.pop() || null; }
  clear() { this.items = []; }
  get size() { return this.items.length; }
}
