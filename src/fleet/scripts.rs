//! The fleet tier's Redis scripts and the encoding of what they store.
//!
//! Every script touches the keys of exactly one group, all named `<prefix>:{<app>:<group>}:…`
//! so that they share one Redis Cluster hash slot (the `{…}` hash tag), and takes the time
//! from Redis (`TIME`), so replicas need not agree on a clock: an item's age is Redis's
//! now minus the Redis time it was fetched at, the same on every replica.
//!
//! Per group:
//! - `items` — hash MsgSeq → `fetched_ms,code,read,unread` (counts empty when absent),
//!   then `,c<fresh_ms>` for an item kept current by callbacks (fresh that long rather
//!   than `ttl`); expires `ttl + stale` after its last write, and past 256 items a write
//!   drops those past their stale window;
//! - `inflight` — hash MsgSeq → `owner,expires_ms`: the replica fetching it, until when;
//! - `lease` — the replica whose next call for the group takes the `wanted` set;
//! - `wanted` — set of MsgSeqs other replicas wait for, taken by the lease holder's call;
//! - `group` — a group-level answer (10010 / 10015): `fetched_ms,code,info`;
//! - `reads` — hash MsgSeq → when any replica last read it (ms): the fleet's cohort.

use redis::Script;

/// Looks up and claims one request's misses. KEYS: items, inflight, lease, wanted, group.
/// ARGV: me, ttl_ms, negative_ttl_ms, lease_ms, n, then n requested MsgSeqs.
/// Returns {now_ms, group_answer or "", items…, roles} where roles is one character per
/// requested MsgSeq: `f` fresh in Redis, `m` claimed by me, `w` wait for another replica;
/// then the earliest time (ms) a blocking claim or lease expires (0: none).
pub const CLAIM: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl, neg, lease_ms, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local answer = redis.call('GET', KEYS[5])
if answer then return {now, answer} end
local lease = redis.call('GET', KEYS[3])
local other_leads = lease and lease ~= me
local lease_end = 0
if other_leads then lease_end = now + math.max(redis.call('PTTL', KEYS[3]), 0) end
local function fresh(v)
  if not v then return false end
  local f, code = string.match(v, '^(%d+),(%-?%d+)')
  local life = tonumber(string.match(v, ',c(%d+)$') or ttl)
  if code == '10062' then life = neg end
  return now - tonumber(f) < life
end
local function holder(seq)
  local v = redis.call('HGET', KEYS[2], seq)
  if not v then return nil, 0 end
  local owner, exp = string.match(v, '^(.*),(%d+)$')
  exp = tonumber(exp)
  if exp <= now then return nil, 0 end
  return owner, exp
end
local out, roles, retry, claimed = {now, ''}, '', 0, false
local function wait_until(at)
  if retry == 0 or at < retry then retry = at end
end
for i = 1, n do
  local seq = ARGV[5 + i]
  local v = redis.call('HGET', KEYS[1], seq)
  out[#out + 1] = v or ''
  if fresh(v) then
    roles = roles .. 'f'
  else
    local owner, exp = holder(seq)
    if owner and owner ~= me then
      roles = roles .. 'w'
      wait_until(exp)
    elseif other_leads and not owner then
      redis.call('SADD', KEYS[4], seq)
      roles = roles .. 'w'
      wait_until(lease_end)
    else
      redis.call('HSET', KEYS[2], seq, me .. ',' .. (now + lease_ms))
      roles = roles .. 'm'
      claimed = true
    end
  end
end
if other_leads then redis.call('PEXPIRE', KEYS[4], lease_ms * 4) end
if claimed then
  redis.call('SET', KEYS[3], me, 'PX', lease_ms)
  redis.call('PEXPIRE', KEYS[2], lease_ms * 4)
end
out[#out + 1] = roles
out[#out + 1] = retry
return out
"#;

/// The lease holder's call is about to leave: takes up to `room` MsgSeqs, first those
/// other replicas wait for (not fresh, not in flight), then the fleet's cohort (read by
/// any replica within `memory_ms`, positive, due within half a TTL, not in flight), and
/// claims them with the call's own; then, for a group the fleet has not cached near the
/// top, its neighbourhood: the MsgSeqs within `window` below the highest in the call
/// that Redis does not hold and nobody fetches. KEYS: items, inflight, lease, wanted,
/// reads. ARGV: me, ttl_ms, negative_ttl_ms, lease_ms, room, memory_ms, window, then the
/// call's own MsgSeqs (their claims are renewed). Returns how many of the MsgSeqs taken
/// other replicas wait for, then the MsgSeqs taken (those first).
pub const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl, neg, lease_ms, room = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local memory, window = tonumber(ARGV[6]), tonumber(ARGV[7])
local claim = me .. ',' .. (now + lease_ms)
local chosen, taken, top = {}, {}, 0
-- Redis's answer for seq, if any: its fetch time and whether it is still fresh.
local function item(seq)
  local v = redis.call('HGET', KEYS[1], seq)
  if not v then return nil end
  local f, code = string.match(v, '^(%d+),(%-?%d+)')
  local life = tonumber(string.match(v, ',c(%d+)$') or ttl)
  if code == '10062' then life = neg end
  return tonumber(f), now - tonumber(f) < life, code, life
end
-- Whether some replica's unexpired claim holds seq.
local function busy(seq)
  local held = redis.call('HGET', KEYS[2], seq)
  return held ~= false and held ~= nil and tonumber(string.match(held, ',(%d+)$')) > now
end
local function take(seq)
  redis.call('HSET', KEYS[2], seq, claim)
  taken[#taken + 1] = seq
  chosen[seq] = true
end
for i = 8, #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], claim)
  chosen[ARGV[i]] = true
  top = math.max(top, tonumber(ARGV[i]))
end
-- 1. What other replicas wait for.
if room > 0 then
  for _, seq in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    if #taken >= room then break end
    redis.call('SREM', KEYS[4], seq)
    local _, fresh = item(seq)
    if not fresh and not busy(seq) and not chosen[seq] then take(seq) end
  end
end
local wanted = #taken
-- 2. The fleet's cohort: read lately by any replica, positive, due within half a TTL.
if #taken < room then
  local reads = redis.call('HGETALL', KEYS[5])
  for i = 1, #reads, 2 do
    if #taken >= room then break end
    local seq = reads[i]
    if not chosen[seq] and now - tonumber(reads[i + 1]) <= memory then
      local f, _, code, life = item(seq)
      if f and code ~= '10062' and f + life <= now + life / 2 and not busy(seq) then take(seq) end
    end
  end
end
-- 3. The neighbourhood the fleet has not cached (MsgSeqs above 2^53 are not exact here).
for i = 1, #taken do top = math.max(top, tonumber(taken[i])) end
local seq = top - 1
while #taken < room and seq >= 1 and seq >= top - window and top < 9007199254740992 do
  local key = string.format('%.0f', seq)
  if not chosen[key] and redis.call('HEXISTS', KEYS[1], key) == 0 and not busy(key) then take(key) end
  seq = seq - 1
end
local lease = redis.call('GET', KEYS[3])
if not lease or lease == me then redis.call('SET', KEYS[3], me, 'PX', lease_ms) end
redis.call('PEXPIRE', KEYS[2], lease_ms * 4)
table.insert(taken, 1, wanted)
return taken
"#;

/// A call's answer: stores its items, releases its claims (answered or not), drops the
/// lease if this replica holds it, and tells every replica. KEYS: items, inflight, lease,
/// wanted, group. ARGV: me, age_ms (how long ago the answer arrived), keep_ms, channel,
/// message, group answer (`code,info` or ""), group_ttl_ms, n stored, then n pairs of
/// MsgSeq and `code,read,unread`, then MsgSeqs only released.
pub const STORE: &str = r#"
local PRUNE_ABOVE = 256
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, age, keep, channel, message = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local fetched = now - age
if ARGV[6] ~= '' and tonumber(ARGV[7]) > 0 then
  redis.call('SET', KEYS[5], fetched .. ',' .. ARGV[6], 'PX', ARGV[7])
end
local n = tonumber(ARGV[8])
local function release(seq)
  local held = redis.call('HGET', KEYS[2], seq)
  if held and string.match(held, '^(.*),%d+$') == me then redis.call('HDEL', KEYS[2], seq) end
  redis.call('SREM', KEYS[4], seq)
end
for i = 0, n - 1 do
  local seq = ARGV[9 + 2 * i]
  redis.call('HSET', KEYS[1], seq, fetched .. ',' .. ARGV[10 + 2 * i])
  release(seq)
end
for i = 9 + 2 * n, #ARGV do release(ARGV[i]) end
if n > 0 then
  redis.call('PEXPIRE', KEYS[1], keep)
  -- A busy group's hash would keep every MsgSeq it was ever asked for: past PRUNE_ABOVE
  -- items, drop those older than their stale window.
  if redis.call('HLEN', KEYS[1]) > PRUNE_ABOVE then
    local all = redis.call('HGETALL', KEYS[1])
    for i = 1, #all, 2 do
      local f = tonumber(string.match(all[i + 1], '^(%d+),'))
      if not f or now - f > keep then redis.call('HDEL', KEYS[1], all[i]) end
    end
  end
end
if redis.call('GET', KEYS[3]) == me then redis.call('DEL', KEYS[3]) end
redis.call('PUBLISH', channel, message)
return n
"#;

/// A replica's reads of one group since it last shared them. KEYS: reads. ARGV:
/// keep_ms, then pairs of MsgSeq and how long ago it was read (ms). Keeps the latest
/// read per MsgSeq; the hash expires `keep_ms` after its last write.
pub const READS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV, 2 do
  local at = now - tonumber(ARGV[i + 1])
  local held = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if at > held then redis.call('HSET', KEYS[1], ARGV[i], at) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"#;

/// A callback's reads of one group (docs/design.md#callbacks): stores each item unless Redis holds
/// a newer one, then tells every replica (the items themselves, so that each replica's own cache
/// takes them at once) and wakes the requests waiting for the group. KEYS: items. ARGV: keep_ms,
/// stored channel, waiter message, callbacks channel, callbacks message, then triples of MsgSeq,
/// age_ms (how long ago the read happened) and `code,read,unread,c<fresh_ms>`. Returns how many
/// items were stored.
pub const CALLBACK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stored = 0
for i = 6, #ARGV, 3 do
  local at = now - tonumber(ARGV[i + 1])
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  local f = held and tonumber(string.match(held, '^(%d+),'))
  if not f or f <= at then
    redis.call('HSET', KEYS[1], ARGV[i], at .. ',' .. ARGV[i + 2])
    stored = stored + 1
  end
end
if stored > 0 and redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return stored
"#;

/// The scripts, hashed once; sent by SHA and reloaded by the crate on NOSCRIPT.
pub struct Scripts {
    pub claim: Script,
    pub take: Script,
    pub store: Script,
    pub reads: Script,
    pub callback: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            claim: Script::new(CLAIM),
            take: Script::new(TAKE),
            store: Script::new(STORE),
            reads: Script::new(READS),
            callback: Script::new(CALLBACK),
        }
    }

    /// Every script, for loading on a new connection.
    pub fn all(&self) -> [Script; 5] {
        [self.claim.clone(), self.take.clone(), self.store.clone(), self.reads.clone(), self.callback.clone()]
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
