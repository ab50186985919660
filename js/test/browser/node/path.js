// node:path (posix) for the parity suite in a browser: the few functions it uses, on the server's URL paths.
function normalize(p) {
  const abs = p.startsWith('/');
  const out = [];
  for (const part of p.split('/')) {
    if (!part || part === '.') continue;
    if (part === '..') {
      if (out.length && out[out.length - 1] !== '..') out.pop();
      else if (!abs) out.push('..');
    } else out.push(part);
  }
  return (abs ? '/' : '') + out.join('/') || (abs ? '/' : '.');
}
export const join = (...parts) => normalize(parts.filter((p) => p !== '').join('/'));
export function resolve(...parts) {
  let p = '';
  for (const part of parts) p = part.startsWith('/') ? part : `${p}/${part}`;
  return normalize(p.startsWith('/') ? p : `/${p}`);
}
export function dirname(p) {
  const n = normalize(p);
  const i = n.lastIndexOf('/');
  return i <= 0 ? (n.startsWith('/') ? '/' : '.') : n.slice(0, i);
}
export const basename = (p) => normalize(p).split('/').pop();
export const extname = (p) => {
  const b = basename(p);
  const i = b.lastIndexOf('.');
  return i > 0 ? b.slice(i) : '';
};
export const sep = '/';
export default { join, resolve, dirname, basename, extname, sep, normalize };
