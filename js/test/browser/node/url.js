// node:url for the parity suite in a browser: a module's URL → its path on the test server.
export const fileURLToPath = (u) => decodeURIComponent(new URL(u).pathname);
export const pathToFileURL = (p) => new URL(p, self.location.origin);
export default { fileURLToPath, pathToFileURL };
