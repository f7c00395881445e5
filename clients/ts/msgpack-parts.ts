// The parts encoder lives in core (the server encodes answers with it too).
export { packParts, joinParts, type Parts } from '../../core/msgpack-parts.js';
