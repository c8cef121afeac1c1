// File formats the page reads and writes in the browser: NIfTI-1 volumes (images, masks), .npy float32 maps (the
// infer answer's inline uncertainty), 8-bit greyscale PNG (2D labels), gzip. No library: the browser's
// (De)CompressionStream does the zlib / gzip work.

async function pipe(bytes, stream) {
  return new Uint8Array(await new Response(new Blob([bytes]).stream().pipeThrough(stream)).arrayBuffer());
}
export const gunzip = (bytes) => pipe(bytes, new DecompressionStream("gzip"));
export const gzip = (bytes) => pipe(bytes, new CompressionStream("gzip"));
const zlib = (bytes) => pipe(bytes, new CompressionStream("deflate"));

export function isGzip(b) { return b.length > 2 && b[0] === 0x1f && b[1] === 0x8b; }

// ---------------------------------------------------------------------------------------------------- NIfTI-1
const NIFTI_TYPES = {2: Uint8Array, 4: Int16Array, 8: Int32Array, 16: Float32Array, 64: Float64Array,
                     256: Int8Array, 512: Uint16Array, 768: Uint32Array};

/** Parse a NIfTI-1 file (bytes, gzip or not) -> {dims: [nx, ny, nz], data: Float32Array (x fastest), header}. */
export async function readNifti(bytes) {
  if (isGzip(bytes)) bytes = await gunzip(bytes);
  if (bytes.length < 348) throw new Error("not a NIfTI file (shorter than its 348-byte header)");
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let le = true;
  if (dv.getInt32(0, true) !== 348) {
    if (dv.getInt32(0, false) !== 348) throw new Error("not a NIfTI-1 file (header size is not 348)");
    le = false;
  }
  const dim = Array.from({length: 8}, (_, i) => dv.getInt16(40 + 2 * i, le));
  const datatype = dv.getInt16(70, le);
  const Type = NIFTI_TYPES[datatype];
  if (!Type) throw new Error(`NIfTI data type ${datatype} is not supported here (grey volumes only)`);
  if (dim[0] > 3 && dim.slice(4, dim[0] + 1).some((d) => d > 1)) throw new Error("4D volumes are not supported");
  const [nx, ny, nz] = [dim[1], dim[0] >= 2 ? dim[2] : 1, dim[0] >= 3 ? dim[3] : 1];
  const offset = Math.max(352, Math.round(dv.getFloat32(108, le)));
  const n = nx * ny * nz;
  const size = Type.BYTES_PER_ELEMENT;
  if (bytes.length < offset + n * size) throw new Error("NIfTI file is truncated");
  const raw = bytes.slice(offset, offset + n * size);  // aligned copy
  if (!le && size > 1) {  // swap to the machine's (little-endian) order
    for (let i = 0; i < raw.length; i += size) raw.subarray(i, i + size).reverse();
  }
  const typed = new Type(raw.buffer);
  let slope = dv.getFloat32(112, le), inter = dv.getFloat32(116, le);
  if (!slope || !isFinite(slope)) { slope = 1; inter = 0; }
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = typed[i] * slope + inter;
  return {dims: [nx, ny, nz], data, header: bytes.slice(0, 348), littleEndian: le};
}

/** A uint8 NIfTI-1 (.nii.gz bytes) on the grid of the image whose 348-byte header is given; data x fastest. */
export async function writeNiftiU8(header, le, dims, data) {
  const out = new Uint8Array(352 + data.length);
  out.set(header.subarray(0, 348));
  const dv = new DataView(out.buffer);
  dv.setInt16(40, 3, le);
  dims.forEach((d, i) => dv.setInt16(42 + 2 * i, d, le));
  for (let i = 4; i < 8; i++) dv.setInt16(40 + 2 * i, 1, le);
  dv.setInt16(70, 2, le);   // datatype uint8
  dv.setInt16(72, 8, le);   // bitpix
  dv.setFloat32(108, 352, le);  // vox_offset
  dv.setFloat32(112, 1, le);    // scl_slope
  dv.setFloat32(116, 0, le);    // scl_inter
  dv.setFloat32(124, 0, le);    // cal_max
  dv.setFloat32(128, 0, le);    // cal_min
  out.set([0x6e, 0x2b, 0x31, 0x00], 344);  // magic "n+1": one file
  out.set(data, 352);
  return gzip(out);
}

// ---------------------------------------------------------------------------------------------------- .npy
/** Parse a .npy file (bytes) -> {shape, data: Float32Array in C order (last axis fastest)}. */
export function readNpy(bytes) {
  const magic = String.fromCharCode(...bytes.subarray(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy array");
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  const hlen = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const head = new TextDecoder().decode(bytes.subarray(start, start + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(head)[1];
  const fortran = /'fortran_order':\s*True/.test(head);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(head)[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (descr !== "<f4") throw new Error(`.npy dtype ${descr} is not supported (float32 only)`);
  const n = shape.reduce((a, b) => a * b, 1);
  const flat = new Float32Array(bytes.slice(start + hlen, start + hlen + 4 * n).buffer);
  if (!fortran || shape.length < 2) return {shape, data: flat};
  // Fortran order -> C order
  const data = new Float32Array(n);
  const strides = shape.map((_, i) => shape.slice(0, i).reduce((a, b) => a * b, 1));  // Fortran strides
  const idx = new Array(shape.length).fill(0);
  for (let c = 0; c < n; c++) {
    let f = 0;
    for (let a = 0; a < shape.length; a++) f += idx[a] * strides[a];
    data[c] = flat[f];
    for (let a = shape.length - 1; a >= 0; a--) { if (++idx[a] < shape[a]) break; idx[a] = 0; }
  }
  return {shape, data};
}

export function base64ToBytes(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

// ---------------------------------------------------------------------------------------------------- PNG
const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, body) {
  const out = new Uint8Array(12 + body.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, body.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(body, 8);
  dv.setUint32(8 + body.length, crc32(out.subarray(4, 8 + body.length)));
  return out;
}

/** An 8-bit greyscale PNG (bytes) of `data` (row-major, width x height): the label values exactly. */
export async function encodePngGray8(data, width, height) {
  const raw = new Uint8Array((width + 1) * height);
  for (let r = 0; r < height; r++) raw.set(data.subarray(r * width, (r + 1) * width), r * (width + 1) + 1);
  const ihdr = new Uint8Array(13);
  const dv = new DataView(ihdr.buffer);
  dv.setUint32(0, width);
  dv.setUint32(4, height);
  ihdr.set([8, 0, 0, 0, 0], 8);  // bit depth 8, colour type 0 (grey), deflate, filter 0, no interlace
  const parts = [new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", ihdr),
                 chunk("IDAT", await zlib(raw)), chunk("IEND", new Uint8Array(0))];
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

/** Decode a PNG / JPEG (blob) to its RGBA pixels without colour management: {width, height, rgba, bitmap}. */
export async function decodeImage(blob) {
  const bitmap = await createImageBitmap(blob, {colorSpaceConversion: "none", premultiplyAlpha: "none"});
  const c = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = c.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(bitmap, 0, 0);
  return {width: bitmap.width, height: bitmap.height, rgba: ctx.getImageData(0, 0, bitmap.width, bitmap.height).data,
          bitmap};
}
