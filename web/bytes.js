// Binary helpers for file transfers: base64 both ways and SHA-256.

/** Base64 of bytes, in chunks so a big file does not overflow the argument list. */
export function toBase64(data) {
  let binary = "";
  const CHUNK = 0x8000;
  for (let i = 0; i < data.length; i += CHUNK) {
    binary += String.fromCharCode.apply(null, data.subarray(i, i + CHUNK));
  }
  return btoa(binary);
}

/** Bytes of a base64 string; throws a readable error on bad input. */
export function fromBase64(b64) {
  let binary;
  try {
    binary = atob(b64);
  } catch {
    throw new Error("the agent sent data that is not valid base64");
  }
  const data = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) data[i] = binary.charCodeAt(i);
  return data;
}

/**
 * Hex SHA-256, or null where the browser offers no crypto.subtle (pages served over plain
 * HTTP from another host are not a "secure context"); the check is then skipped.
 */
export async function sha256Hex(data) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
}
