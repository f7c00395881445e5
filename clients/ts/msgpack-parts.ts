// The parts encoder and its decoder live in core (the server encodes answers and decodes requests with them too).
export { packParts, packInto, joinParts, type Parts } from '../../core/msgpack-parts.js';
export { unpackView } from '../../core/msgpack-parts-decode.js';
