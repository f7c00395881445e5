// A file's page cache, written back and dropped off the event loop
// (native/bindings/convert_binding.cc says why).
import { nativeAddon } from './addon.js';

const addon = nativeAddon<{ writeBackDrop(paths: string[]): Promise<boolean> }>();

/**
 * Writes each file's dirty pages and waits for them, then drops its clean
 * pages no process maps: no durability point (no journal commit), and the
 * contents never change. False where a file does not open or the system
 * does neither (not Linux).
 */
export function writeBackDrop(paths: string[]): Promise<boolean> {
  return addon.writeBackDrop(paths);
}
