// Copies between host arrays off the event loop, spread over the native
// pool (native/bindings/copy_binding.cc says why).
import { nativeAddon } from './addon.js';

const addon = nativeAddon<{ copyRanges(src: Uint8Array[], dst: Uint8Array[]): Promise<void> }>();

/**
 * dst[i].set(src[i]) for every i (each pair the same size), on other
 * threads: neither side may be written, nor dst read, until it resolves.
 */
export function copyRanges(src: Uint8Array[], dst: Uint8Array[]): Promise<void> {
  return addon.copyRanges(src, dst);
}
