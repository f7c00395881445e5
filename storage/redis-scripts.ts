// The Lua scripts that change a document's metadata hash. Each touches one
// document's keys (the hash and its lease share a slot), so each runs
// atomically on that slot's master: two servers cannot both create a
// document, a seal cannot land after its loader lost the lease, and a
// document whose loader died is marked incomplete exactly once.
//
// The hash: status (loading | ready | incomplete), meta (JSON without status
// and methods), methods (comma-separated), gen, owner, x<layer> (blocks
// written per layer, for removal). The lease: the owner's id, with a TTL.

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
 * KEYS: hash, lease. ARGV: meta, methods, gen, owner, leaseMs.
 * → {'exists', status} or {'ok', previous hash as a flat list (empty if none)}.
 */
export const CREATE = `
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'loading' and redis.call('EXISTS', KEYS[2]) == 0 then st = 'incomplete' end
if st and st ~= 'incomplete' then return {'exists', st} end
local old = {}
if st then old = redis.call('HGETALL', KEYS[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'status', 'loading', 'meta', ARGV[1], 'methods', ARGV[2], 'gen', ARGV[3], 'owner', ARGV[4])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
return {'ok', old}`;

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

/** KEYS: hash, lease. ARGV: gen, owner, meta. → 'ok', or why not. */
export const SEAL = `
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return 'gone' end
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'loading' then return st end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 'lease' end
redis.call('HSET', KEYS[1], 'status', 'ready', 'meta', ARGV[3])
redis.call('DEL', KEYS[2])
return 'ok'`;

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
 * KEYS: hash, lease. ARGV: createdAt, optional: removes the document only if
 * it is the one created then (compared in the same step as the removal, so a
 * document made again through another server is never removed by a stale
 * conditional delete). → {'ok', the removed hash as a flat list (empty if
 * none)} or {'other', the document's createdAt} (nothing removed).
 */
export const REMOVE = `
local old = redis.call('HGETALL', KEYS[1])
if ARGV[1] and #old > 0 then
  local created = cjson.decode(redis.call('HGET', KEYS[1], 'meta')).createdAt
  if created ~= ARGV[1] then return {'other', tostring(created)} end
end
redis.call('DEL', KEYS[1], KEYS[2])
return {'ok', old}`;
