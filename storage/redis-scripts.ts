// The Lua scripts that change a document's metadata hash. Each touches one
// document's keys (the hash and its lease share a slot), so each runs
// atomically on that slot's master: two servers cannot both create a
// document, a seal cannot land after its loader lost the lease, and a
// document whose loader died is marked incomplete exactly once.
//
// The hash: status (loading | ready | incomplete), meta (JSON without status
// and methods), methods (comma-separated), gen, owner, x<layer> (blocks
// written per layer, for removal). The lease: the owner's id, with a TTL.
//
// A reply can be lost after its script ran (a connection reset, a failover,
// a timeout), and the worker then runs the script again. For create, seal
// and remove a second run would answer from the state the first one left
// (409 "exists", 409 "ready", nothing to remove: the lease never recorded,
// the old blocks never dropped). So each call draws a token, and the run
// that changes the hash leaves its answer in a receipt under that token (in
// the document's slot, with a TTL that outlives the call's retries): a
// second run of the same call returns the receipt, and the worker acts on
// it once.

/** KEYS: hash, lease. → nil, or {status, meta, methods, gen, flipped} (flipped: this call marked it incomplete). */
export const READ = `
local h = redis.call('HMGET', KEYS[1], 'status', 'meta', 'methods', 'gen')
if not h[1] then return false end
local flipped = 0
if h[1] == 'loading' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'incomplete')
  h[1] = 'incomplete'
  flipped = 1
end
return {h[1], h[2], h[3] or '', h[4], flipped}`;

/**
 * Opens a script whose KEYS[3] is the call's receipt and ARGV[1] its TTL: a
 * receipt there ends the script with its answer; answer(reply) records one.
 * Runs that change nothing record none: asked again, they answer from the
 * state then.
 */
const RECEIPT = `
local done = redis.call('GET', KEYS[3])
if done then return cjson.decode(done) end
local function answer(reply)
  redis.call('SET', KEYS[3], cjson.encode(reply), 'PX', ARGV[1])
  return reply
end`;

/**
 * KEYS: hash, lease, receipt. ARGV: receiptMs, meta, methods, gen, owner, leaseMs.
 * → {'exists', status} or {'ok', previous hash as a flat list (empty if none)}.
 */
export const CREATE = `${RECEIPT}
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'loading' and redis.call('EXISTS', KEYS[2]) == 0 then st = 'incomplete' end
if st and st ~= 'incomplete' then return {'exists', st} end
local old = {}
if st then old = redis.call('HGETALL', KEYS[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'status', 'loading', 'meta', ARGV[2], 'methods', ARGV[3], 'gen', ARGV[4], 'owner', ARGV[5])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
return answer({'ok', old})`;

/** KEYS: lease. ARGV: owner, leaseMs. → 1 renewed, 0 lost. */
export const RENEW = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0`;

/** KEYS: hash. ARGV: gen, then (field, blocks) pairs: raises each x<layer> to at least blocks. → 0 if the document is not that generation. */
export const EXTENT = `
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1`;

/** KEYS: hash, lease, receipt. ARGV: receiptMs, gen, owner, meta. → 'ok', or why not. */
export const SEAL = `${RECEIPT}
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] then return 'gone' end
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'loading' then return st end
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 'lease' end
redis.call('HSET', KEYS[1], 'status', 'ready', 'meta', ARGV[4])
redis.call('DEL', KEYS[2])
return answer('ok')`;

/** KEYS: hash. ARGV: gen, method. → 1, or 0 if the document is not that generation. */
export const ADD_METHOD = `
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return 0 end
local m = redis.call('HGET', KEYS[1], 'methods') or ''
for name in string.gmatch(m, '[^,]+') do
  if name == ARGV[2] then return 1 end
end
if m == '' then m = ARGV[2] else m = m .. ',' .. ARGV[2] end
redis.call('HSET', KEYS[1], 'methods', m)
return 1`;

/**
 * KEYS: hash, lease, receipt. ARGV: receiptMs, then createdAt, optional:
 * removes the document only if it is the one created then (compared in the
 * same step as the removal, so a document made again through another server
 * is never removed by a stale conditional delete). → {'ok', the removed hash
 * as a flat list (empty if none)} or {'other', the document's createdAt}
 * (nothing removed).
 */
export const REMOVE = `${RECEIPT}
local old = redis.call('HGETALL', KEYS[1])
if ARGV[2] and #old > 0 then
  local created = cjson.decode(redis.call('HGET', KEYS[1], 'meta')).createdAt
  if created ~= ARGV[2] then return {'other', tostring(created)} end
end
redis.call('DEL', KEYS[1], KEYS[2])
if #old == 0 then return {'ok', old} end
return answer({'ok', old})`;
