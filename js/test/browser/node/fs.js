// node:fs (synchronous reads) for the parity suite in a browser. Paths are the test server's URL paths; the server's
// listing (globalThis.__kilnFs.listing: every file and directory under the served data roots, fetched before the
// suite is imported) answers existsSync / readdirSync; readFileSync fetches with a synchronous XMLHttpRequest (bytes
// through the x-user-defined charset, which works on the main thread too); writeFileSync keeps the data in memory
// (__kilnFs.written) for the page to return.
const state = () => globalThis.__kilnFs;

export function existsSync(p) {
  return state().listing.has(p.replace(/\/+$/, ''));
}
export function readdirSync(p) {
  const dir = p.replace(/\/+$/, '');
  const names = state().listing.get(dir);
  if (!Array.isArray(names)) throw new Error(`ENOTDIR / ENOENT: ${p}`);
  return [...names];
}
export function readFileSync(p, encoding) {
  const xhr = new XMLHttpRequest();
  xhr.open('GET', p, false);
  xhr.overrideMimeType('text/plain; charset=x-user-defined');
  xhr.send();
  if (xhr.status !== 200) throw new Error(`ENOENT: ${p} (HTTP ${xhr.status})`);
  const s = xhr.responseText;
  const bytes = new globalThis.Buffer(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i) & 0xff;
  return encoding ? bytes.toString(encoding) : bytes;
}
export function writeFileSync(p, data) {
  state().written[p] = typeof data === 'string' ? data : new TextDecoder().decode(data);
}
export default { existsSync, readdirSync, readFileSync, writeFileSync };
