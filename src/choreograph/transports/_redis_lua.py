"""The Lua scripts behind :mod:`choreograph.transports.redis`.

Every operation that touches more than one key, or must check before it writes, is one
script: Redis runs a script atomically, so a crash or a competing consumer can never see
half of it, and it costs one round trip. Layout of a bus with prefix ``P``::

    P:groups        hash    group -> JSON list of types (null: every type)
    P:s:<group>     stream  the group's backlog; consumer group <group> reads it
    P:d:<group>     zset    delayed retries: score = due (server ms), member = msgpack
                            [id, type, body, attempt, source entry id]
    P:dl:<group>    stream  dead letters: id, type, body, attempt, record (JSON), dead_at
    P:dlx:<group>   hash    message id -> its dead letter's entry id in P:dl:<group>

One dead letter per (group, message id): dead-lettering an id again (another copy of an
event published twice, both failed) deletes the older entry, found by ``P:dlx``, so the
stream holds the latest record at its latest place. A dead-letter stream written before
the index (it may hold an id twice) is indexed by the first script that writes or
replays its letters, or by ``INDEX`` before a listing: one walk, keeping each id's newest.

A stream entry has the fields ``id``, ``type``, ``body`` and ``attempt`` (the attempt of
its first delivery; absent on a fresh publish, meaning 1); the delivery count Redis
keeps in the pending list adds the lease expiries: ``attempt + count - 1``. Times come from the server (``TIME``) so processes
with skewed clocks agree on when a retry is due.
"""

from __future__ import annotations

# Field table of a stream entry (flat [f1, v1, f2, v2, ...] as XRANGE returns it).
_FIELDS = """
local function fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ensure_group(stream, group)
  local ok = redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  if type(ok) == 'table' and ok.err and not string.find(ok.err, 'BUSYGROUP') then
    return redis.error_reply(ok.err)
  end
end
-- Stream entry ids "<ms>-<seq>": is `a` older than `b`?
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if tonumber(am) ~= tonumber(bm) then return tonumber(am) < tonumber(bm) end
  return tonumber(as) < tonumber(bs)
end
-- Index the dead letters of `dead` by message id in `index` if that was never done (an
-- empty index with letters: a stream from before the index), deleting older duplicates.
local function index_letters(dead, index)
  if redis.call('EXISTS', index) == 1 or redis.call('XLEN', dead) == 0 then return end
  for _, e in ipairs(redis.call('XRANGE', dead, '-', '+')) do
    local mid = fields(e[2])['id'] or e[1]
    local prev = redis.call('HGET', index, mid)
    if prev then redis.call('XDEL', dead, prev) end
    redis.call('HSET', index, mid, e[1])
  end
end
-- Is entry `id` still pending on consumer `me` with the delivery count we handed out?
local function held(stream, group, me, id, count)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p == 1 and p[1][2] == me and tonumber(p[1][4]) == tonumber(count)
end
"""

#: KEYS: registry, stream.  ARGV: group, types JSON, idle ms.
#: Registers the group, widening the types it is bound to (never narrowing them: see the
#: Transport docstring), and forgets consumer names that hold nothing and were idle longer
#: than a lease (left by crashed processes). Deleting one that holds nothing is always
#: safe: a live consumer is re-created by its next read.
REGISTER = (
    _FIELDS
    + """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local bound = ARGV[2]
if old then
  local was = cjson.decode(old)
  local wanted = cjson.decode(ARGV[2])
  if was == cjson.null then
    bound = old
  elseif wanted ~= cjson.null then
    local seen, merged, grew = {}, {}, false
    for _, t in ipairs(was) do seen[t] = true; merged[#merged + 1] = t end
    for _, t in ipairs(wanted) do
      if not seen[t] then seen[t] = true; merged[#merged + 1] = t; grew = true end
    end
    if grew then table.sort(merged); bound = cjson.encode(merged) else bound = old end
  end
end
if bound ~= old then redis.call('HSET', KEYS[1], ARGV[1], bound) end
local err = ensure_group(KEYS[2], ARGV[1])
if err then return err end
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[2], ARGV[1])) do
  local f = fields(c)
  if tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[2], ARGV[1], f['name'])
  end
end
return 1
"""
)

#: KEYS: registry.  ARGV: group, JSON list of types to remove.
#: Narrows the group's types; returns its types JSON afterwards (false: no such group; a
#: wildcard's null is returned unchanged). Only the registry changes: the group's stream
#: keeps what it holds, and the publish script reads the registry anew each time.
UNBIND = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return false end
local was = cjson.decode(old)
if was == cjson.null then return old end
local gone = {}
for _, t in ipairs(cjson.decode(ARGV[2])) do gone[t] = true end
local kept, changed = {}, false
for _, t in ipairs(was) do
  if gone[t] then changed = true else kept[#kept + 1] = t end
end
if not changed then return old end
table.sort(kept)
-- cjson writes an empty table as {}: spell the empty list out
local bound = #kept == 0 and '[]' or cjson.encode(kept)
redis.call('HSET', KEYS[1], ARGV[1], bound)
return bound
"""

#: KEYS: registry.  ARGV: prefix, maxlen (0: none), then (id, type, body) per message.
#: Routes every message to the stream of each group bound to its type. Reading the
#: registry here, not in the client, makes routing atomic with registration.
PUBLISH = """
local prefix, maxlen = ARGV[1], tonumber(ARGV[2])
local registry = redis.call('HGETALL', KEYS[1])
local wildcard, bound = {}, {}
for i = 1, #registry, 2 do
  local types = cjson.decode(registry[i + 1])
  if types == cjson.null then
    wildcard[#wildcard + 1] = registry[i]
  else
    for _, t in ipairs(types) do
      bound[t] = bound[t] or {}
      table.insert(bound[t], registry[i])
    end
  end
end
local cache = {}
local function targets(t)
  local out = cache[t]
  if out then return out end
  out = {}
  for _, g in ipairs(wildcard) do out[#out + 1] = g end
  for _, g in ipairs(bound[t] or {}) do out[#out + 1] = g end
  cache[t] = out
  return out
end
if maxlen > 0 then
  local adding = {}
  for i = 3, #ARGV, 3 do
    for _, g in ipairs(targets(ARGV[i + 1])) do adding[g] = (adding[g] or 0) + 1 end
  end
  for g, n in pairs(adding) do
    local backlog = redis.call('XLEN', prefix .. ':s:' .. g) + redis.call('ZCARD', prefix .. ':d:' .. g)
    if backlog + n > maxlen then
      return redis.error_reply('BACKLOG group ' .. g .. ' holds ' .. backlog .. ' + ' .. n .. ' > maxlen ' .. maxlen)
    end
  end
end
local written = 0
for i = 3, #ARGV, 3 do
  for _, g in ipairs(targets(ARGV[i + 1])) do
    redis.call('XADD', prefix .. ':s:' .. g, '*', 'id', ARGV[i], 'type', ARGV[i + 1], 'body', ARGV[i + 2])
    written = written + 1
  end
end
return written
"""

#: KEYS: stream, delayed.  ARGV: group, consumer, lease ms, XAUTOCLAIM cursor, count.
#: The consumer's housekeeping and non-blocking read in one step: due retries move back
#: into the stream, lease-expired entries are claimed (with their delivery counts), fresh
#: entries are read. Returns {next cursor, claimed, fresh, ms until next retry or -1}.
SWEEP = (
    _FIELDS
    + """
local stream, delayed = KEYS[1], KEYS[2]
local group, me, lease, cursor, count = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local now = now_ms()
for _, member in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 100)) do
  local m = cmsgpack.unpack(member)
  redis.call('XADD', stream, '*', 'id', m[1], 'type', m[2], 'body', m[3], 'attempt', m[4])
  redis.call('ZREM', delayed, member)
end
local wait = -1
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #first == 2 then wait = math.max(0, tonumber(first[2]) - now) end
local auto = redis.call('XAUTOCLAIM', stream, group, me, lease, cursor, 'COUNT', count)
local claimed = {}
for _, e in ipairs(auto[2]) do
  local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
  claimed[#claimed + 1] = {e[1], e[2], p[1][4]}
end
local fresh = {}
if #claimed < count then
  local r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', count - #claimed, 'STREAMS', stream, '>')
  if r then fresh = r[1][2] end
end
return {auto[1], claimed, fresh, wait}
"""
)

#: KEYS: stream.  ARGV: group, then the entry ids.  Acks and deletes the entries: what a
#: ``MULTI XACK XDEL EXEC`` does, as one command that carries the ids once. ``unpack``
#: takes at most a few thousand values, hence the slices.
ACK = """
local n = 0
for i = 2, #ARGV, 1000 do
  local last = math.min(i + 999, #ARGV)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, last))
  n = n + redis.call('XDEL', KEYS[1], unpack(ARGV, i, last))
end
return n
"""

#: KEYS: stream, delayed, dead, dead-letter index.  ARGV: group, consumer, entry id,
#: delivery count, verb ('retry' | 'dead'), retry delay ms | record JSON, next attempt | attempt.
#: Settles a delivery only if this consumer still holds it (its lease did not expire and
#: the entry was not redelivered meanwhile): a late verb is a no-op, as in every transport.
#: A dead letter replaces the group's older letter of the same message id.
SETTLE = (
    _FIELDS
    + """
local stream, delayed, dead, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, me, id, count, verb = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not held(stream, group, me, id, count) then return 0 end
local e = redis.call('XRANGE', stream, id, id)
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
if #e == 0 then return 0 end
local f = fields(e[1][2])
local mid, mtype, body = f['id'] or id, f['type'] or '', f['body'] or ''
if verb == 'retry' then
  local after = tonumber(ARGV[6])
  if after <= 0 then
    redis.call('XADD', stream, '*', 'id', mid, 'type', mtype, 'body', body, 'attempt', ARGV[7])
  else
    redis.call('ZADD', delayed, now_ms() + after + 1, cmsgpack.pack({mid, mtype, body, ARGV[7], id}))
  end
else
  index_letters(dead, index)
  local prev = redis.call('HGET', index, mid)
  if prev then redis.call('XDEL', dead, prev) end
  local t = redis.call('TIME')
  local letter = redis.call('XADD', dead, '*', 'id', mid, 'type', mtype, 'body', body, 'attempt', ARGV[7],
    'record', ARGV[6], 'dead_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
  redis.call('HSET', index, mid, letter)
end
return 1
"""
)

#: KEYS: stream.  ARGV: group, consumer, idle ms, then (entry id, delivery count) pairs.
#: Resets the idle time of entries this consumer still holds: 0 extends the lease
#: (touch), a huge value hands them to the next consumer's XAUTOCLAIM at once (close).
#: JUSTID leaves the delivery count alone.
HOLD = (
    _FIELDS
    + """
local n = 0
for i = 4, #ARGV, 2 do
  if held(KEYS[1], ARGV[1], ARGV[2], ARGV[i], ARGV[i + 1]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    n = n + 1
  end
end
return n
"""
)

#: KEYS: stream.  ARGV: group, consumer, verb ('adopt' | 'requeue'), lease ms, count, then
#: the ids of the entries the consumer holds in hand.
#: This consumer's pending entries that are not in hand, idle for less than a lease: ones
#: a read was handed by the server whose reply it never read (cancelled, its connection
#: lost). Those idle longer are the next ``XAUTOCLAIM``'s: lease-expired, or handed on by
#: ``close``. ``adopt`` hands up to ``count`` of them out again, with their delivery counts,
#: their idle time reset (as ``touch``: ``XCLAIM ... JUSTID`` leaves the count alone;
#: ``XREADGROUP`` of the consumer's history would add one to it, and to those in hand,
#: whose settling then finds them no longer held). ``requeue`` (closing) puts them back at the stream's end as the attempt
#: they were read for, which no handler saw (``XCLAIM ... IDLE`` as ``close`` does for
#: what is in hand would make the next ``XAUTOCLAIM`` count one more). An entry deleted
#: meanwhile is acked. Returns {1 if there may be more, {id, fields, count} per adopted}.
ADOPT = (
    _FIELDS
    + """
local stream, group, me, verb = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local lease, count = tonumber(ARGV[4]), tonumber(ARGV[5])
local in_hand = {}
for i = 6, #ARGV do in_hand[ARGV[i]] = true end
local out, n, start = {}, 0, '-'
while true do
  local page = redis.call('XPENDING', stream, group, start, '+', 100, me)
  for _, p in ipairs(page) do
    local id = p[1]
    if not in_hand[id] and tonumber(p[3]) < lease then
      if n >= count then return {1, out} end
      local e = redis.call('XRANGE', stream, id, id)
      if #e == 0 then
        redis.call('XACK', stream, group, id)
      elseif verb == 'adopt' then
        redis.call('XCLAIM', stream, group, me, 0, id, 'IDLE', 0, 'JUSTID')
        out[#out + 1] = {id, e[1][2], p[4]}
        n = n + 1
      else
        local f = fields(e[1][2])
        local attempt = (tonumber(f['attempt']) or 1) + tonumber(p[4]) - 1
        redis.call('XADD', stream, '*', 'id', f['id'] or id, 'type', f['type'] or '', 'body', f['body'] or '',
          'attempt', attempt)
        redis.call('XACK', stream, group, id)
        redis.call('XDEL', stream, id)
        n = n + 1
      end
    end
  end
  if #page < 100 then return {0, out} end
  start = '(' .. page[#page][1]
end
"""
)

#: KEYS: stream.  ARGV: group, consumer. Forget the consumer name if it holds nothing
#: (deleting a consumer that holds entries would strand them).
FORGET = """
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if ok and #p == 0 then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) return 1 end
return 0
"""

#: KEYS: dead, stream, dead-letter index.  ARGV: verb ('replay' | 'purge'), group, start ('-' or '(<id>'),
#: end ('': the newest dead letter now), chunk, then the message ids to act on (none: all).
#: Scans one chunk of dead letters up to ``end`` and replays (attempt 1, to this group
#: only) or deletes the matching ones. ``end`` is fixed by the first chunk and passed back
#: by the caller: a message a consumer dead-letters again meanwhile lands after it and is
#: not replayed a second time by the same call (nor does the walk go on while they keep up).
#: Returns {how many, where to continue or '', end}.
DEAD = (
    _FIELDS
    + """
local dead, stream, index = KEYS[1], KEYS[2], KEYS[3]
local verb, group, start, last, chunk = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local wanted = nil
if #ARGV > 5 then
  wanted = {}
  for i = 6, #ARGV do wanted[ARGV[i]] = true end
end
if last == '' then
  index_letters(dead, index)
  local newest = redis.call('XREVRANGE', dead, '+', '-', 'COUNT', 1)
  if #newest == 0 then return {0, '', ''} end
  last = newest[1][1]
end
local entries = redis.call('XRANGE', dead, start, last, 'COUNT', chunk)
if verb == 'replay' and #entries > 0 then
  local err = ensure_group(stream, group)
  if err then return err end
end
local n = 0
for _, e in ipairs(entries) do
  local f = fields(e[2])
  if wanted == nil or wanted[f['id']] then
    if verb == 'replay' then
      redis.call('XADD', stream, '*', 'id', f['id'] or e[1], 'type', f['type'] or '', 'body', f['body'] or '', 'attempt', '1')
    end
    redis.call('XDEL', dead, e[1])
    if redis.call('HGET', index, f['id'] or e[1]) == e[1] then redis.call('HDEL', index, f['id'] or e[1]) end
    n = n + 1
  end
end
local next = ''
if #entries == chunk and entries[#entries][1] ~= last then next = '(' .. entries[#entries][1] end
return {n, next, last}
"""
)

#: KEYS: dead, dead-letter index. Indexes a dead-letter stream from before the index (see
#: the module docstring); a no-op on one indexed already. Run before a listing.
INDEX = (
    _FIELDS
    + """
index_letters(KEYS[1], KEYS[2])
return 0
"""
)

#: KEYS: dead, dead-letter index.  ARGV: message id. The group's dead letter of that id
#: (its fields, flat) or false: found by the index, in one step with indexing a stream from
#: before it, so a letter replaced meanwhile is never missed.
LETTER = (
    _FIELDS
    + """
index_letters(KEYS[1], KEYS[2])
local at = redis.call('HGET', KEYS[2], ARGV[1])
if not at then return false end
local e = redis.call('XRANGE', KEYS[1], at, at)
if #e == 0 then return false end
return e[1][2]
"""
)
