#!lua name=tm_v2

-- tm: a durable PREPARE for Redis (see tm-redis/src/lib.rs, "Server-side
-- functions"). Loaded with FUNCTION LOAD REPLACE when a Store opens.
--
-- Versioned: the library's name and its functions' names carry the
-- version (tm_v2, tm_v2_prepare...), so two tm versions on one server each
-- load and call their own. Any change here needs a new version (the
-- client's unit tests hold this text to its version).
--
-- Every key a function touches is passed in KEYS. A transaction's keys come
-- as triples (data key, write-lock key, read-lock key), the keys it only read
-- first (`nread` of them), then the keys it writes. prepare/apply/abort put
-- four keys before the triples (base = REC): the record (under the tag
-- the transaction's keys share); the tombstone that abort leaves and the
-- receipt that apply leaves, both under the empty tag, so that recovery,
-- which may never see the record (and so its tag), finds them by name;
-- and the store's index of records (a set of record key names, so that
-- recovery finds records without scanning the keyspace). The one-phase
-- commit has no record (base = 0).
--
-- A missing record is never taken for success: apply tells a receipt
-- (applied before), a tombstone (aborted) and neither (lost) apart.
-- Receipts and tombstones expire (their TTL is an option of the client):
-- a finish arriving later than that is reported lost, a false alarm but
-- never a false success.
--
-- A write lock is a string holding the writer's txid; read locks are a set of
-- reader txids. Neither has a TTL: only apply and abort remove them.
--
-- The write-set is a flat list of strings:
--   name, nkeys, key_1 .. key_nkeys (triple numbers), nargs, arg_1 .. arg_nargs
-- where name is a Redis command applied as `name data_key args...`, or `*`
-- for a queued command applied as `args...` verbatim. prepare stores it
-- cmsgpack-packed (binary-safe) in the record.
--
-- Replies that refuse start with a code the client maps to its errors:
--   TXCONFLICT <triple> <write|read> <holder>   a lock of another transaction
--   TXINVALID <op> <message>                     the staged commands cannot run
--   TXLOCKTYPE <triple> <write|read> <type>      a lock key holds a value of
--                                                another type (an outside
--                                                client wrote it); triple 0:
--                                                the record index
--   TXABORTED                                    the transaction was aborted
--   TXPREPARED                                   a prepare arrived twice
--                                                (or after the apply)
--   TXLATE                                       a prepare arrived later than
--                                                a tombstone lasts
-- apply's replies when the record is gone: APPLIED, ABORTED, LOST (status).

-- The KEYS of the running call (functions get them as an argument).
local K = {}
-- Where the triples start in the KEYS of prepare, apply and abort.
local REC = 4

local function data_key(base, j) return K[base + 3 * j - 2] end
local function wlock_key(base, j) return K[base + 3 * j - 1] end
local function rlock_key(base, j) return K[base + 3 * j] end
local function triples(base) return (#K - base) / 3 end

-- A variadic command (EXISTS, DEL, MSET) over a long argument list, in
-- chunks (Lua's unpack has a stack limit; 1000 is even, so MSET pairs stay
-- whole). Returns the sum of the integer replies.
local function chunked(command, list)
    local n = 0
    local i = 1
    while i <= #list do
        local j = math.min(i + 999, #list)
        local res = redis.call(command, unpack(list, i, j))
        if type(res) == 'number' then n = n + res end
        i = j + 1
    end
    return n
end

-- Lock check: no other transaction may hold a write lock on a key read or
-- written, nor a read lock on a key written. Refuses at once (never waits).
-- Every lock key the caller will write (prepare, `extra` given, takes the
-- read locks of the keys it only read too) is also checked for its type
-- (another client may have put anything there): a WRONGTYPE raised by a
-- later write would leave a partial prepare, since Lua has no rollback.
local function check_locks(base, nread, txid, extra)
    local n = triples(base)
    local probe = extra or {}
    for j = 1, n do
        probe[#probe + 1] = wlock_key(base, j)
        if j > nread or extra then probe[#probe + 1] = rlock_key(base, j) end
    end
    if chunked('EXISTS', probe) == 0 then return nil end
    if extra then
        if redis.call('EXISTS', extra[2]) > 0 then return 'TXABORTED the transaction was aborted' end
        if redis.call('EXISTS', extra[1], extra[3]) > 0 then return 'TXPREPARED the transaction is already prepared' end
    end
    for j = 1, n do
        local wt = redis.call('TYPE', wlock_key(base, j))['ok']
        if wt ~= 'none' and wt ~= 'string' then return 'TXLOCKTYPE ' .. j .. ' write ' .. wt end
        local rt = 'none'
        if j > nread or extra then
            rt = redis.call('TYPE', rlock_key(base, j))['ok']
            if rt ~= 'none' and rt ~= 'set' then return 'TXLOCKTYPE ' .. j .. ' read ' .. rt end
        end
        if wt == 'string' then
            local w = redis.call('GET', wlock_key(base, j))
            if w ~= txid then return 'TXCONFLICT ' .. j .. ' write ' .. w end
        end
        if j > nread and rt == 'set' then
            for _, r in ipairs(redis.call('SMEMBERS', rlock_key(base, j))) do
                if r ~= txid then return 'TXCONFLICT ' .. j .. ' read ' .. r end
            end
        end
    end
    return nil
end

-- Exact 64-bit integer arithmetic on decimal strings (Lua numbers are
-- doubles): a value is split into a high part and 9 low digits, each exact.
local LIMIT_HI = 9223372036
local LIMIT_LO_POS = 854775807
local LIMIT_LO_NEG = 854775808
local BILLION = 1000000000

-- Parses like Redis's string2ll: optional '-', no '+', no leading zeros,
-- no spaces, within the signed 64-bit range. Returns sign, hi, lo or nil.
local function parse_int(s)
    if s == '0' then return 1, 0, 0 end
    local sign = 1
    local d = s
    if string.sub(s, 1, 1) == '-' then
        sign = -1
        d = string.sub(s, 2)
    end
    local len = #d
    if len == 0 or len > 19 or not string.find(d, '^[1-9]%d*$') then return nil end
    local hi = 0
    if len > 9 then hi = tonumber(string.sub(d, 1, len - 9)) end
    local lo = tonumber(string.sub(d, math.max(1, len - 8)))
    if hi > LIMIT_HI then return nil end
    if hi == LIMIT_HI and lo > (sign > 0 and LIMIT_LO_POS or LIMIT_LO_NEG) then return nil end
    return sign, hi, lo
end

-- a + b for two integer strings; nil, reason when either is not an integer
-- or the sum leaves the signed 64-bit range (as INCRBY would refuse).
local function add_int(a, b)
    local sa, ha, la = parse_int(a)
    if not sa then return nil, 'value is not an integer or out of range' end
    local sb, hb, lb = parse_int(b)
    if not sb then return nil, 'value is not an integer or out of range' end
    local h = sa * ha + sb * hb
    local l = sa * la + sb * lb
    local carry = math.floor(l / BILLION)
    l = l - carry * BILLION
    h = h + carry
    local neg = false
    if h < 0 then
        neg = true
        if l > 0 then
            h = -h - 1
            l = BILLION - l
        else
            h = -h
        end
    end
    if h > LIMIT_HI or (h == LIMIT_HI and l > (neg and LIMIT_LO_NEG or LIMIT_LO_POS)) then
        return nil, 'increment or decrement would overflow'
    end
    local s
    if h > 0 then
        s = string.format('%.0f', h) .. string.format('%09.0f', l)
    else
        s = string.format('%.0f', l)
    end
    if neg and s ~= '0' then s = '-' .. s end
    return s
end

local TYPE_OF = {
    HSET = 'hash', HDEL = 'hash',
    SADD = 'set', SREM = 'set',
    LPUSH = 'list', RPUSH = 'list',
    ZADD = 'zset', ZREM = 'zset',
}
local REMOVES = { HDEL = true, SREM = true, ZREM = true }

-- The one write-set decoder: iterates the writes of `ops` from index
-- `first` (triples counted from `base`), each as { n = write number,
-- name, keys = triple numbers, a = index of its first argument, nargs }. A
-- malformed list raises a TXINVALID refusal (prepare and commit decode it
-- whole, in validate, before their first write).
local function writes(base, ops, first)
    local i = first
    local n = 0
    return function()
        if i > #ops then return nil end
        n = n + 1
        local nkeys = tonumber(ops[i + 1])
        if not nkeys or nkeys < 0 then error({ err = 'TXINVALID 0 malformed write-set' }) end
        local w = { n = n, name = ops[i], keys = {}, a = i + 3 + nkeys }
        for k = 1, nkeys do
            local j = tonumber(ops[i + 1 + k])
            if not j or j < 1 or j > triples(base) then error({ err = 'TXINVALID 0 malformed write-set' }) end
            w.keys[k] = j
        end
        w.nargs = tonumber(ops[w.a - 1])
        if not w.nargs or w.nargs < 0 or w.a + w.nargs - 1 > #ops then
            error({ err = 'TXINVALID 0 malformed write-set' })
        end
        i = w.a + w.nargs
        return w
    end
end

-- Simulates the write-set in order against the current data, before anything
-- is written: types (WRONGTYPE) and INCRBY's integer range. Keys touched by a
-- queued command become 'any' (not simulated). Returns an error text or nil.
local function validate(base, ops, first)
    local types = {}
    local values = {} -- string values known so far (false: not read yet)
    local function type_of(j)
        local t = types[j]
        if t == nil then
            t = redis.call('TYPE', data_key(base, j))['ok']
            types[j] = t
            values[j] = false
        end
        return t
    end
    for w in writes(base, ops, first) do
        local n, name, j, a = w.n, w.name, w.keys[1], w.a
        if name == '*' then
            for _, k in ipairs(w.keys) do types[k] = 'any' end
        elseif not j then
            return 'TXINVALID ' .. n .. ' a staged ' .. name .. ' names no key'
        elseif name == 'SET' then
            types[j] = 'string'
            values[j] = ops[a]
        elseif name == 'DEL' then
            types[j] = 'none'
            values[j] = nil
        elseif name == 'INCRBY' then
            local t = type_of(j)
            if t ~= 'any' then
                local cur
                if t == 'none' then
                    cur = '0'
                elseif t == 'string' then
                    cur = values[j]
                    if cur == false then cur = redis.call('GET', data_key(base, j)) end
                else
                    return 'TXINVALID ' .. n .. ' WRONGTYPE Operation against a key holding the wrong kind of value'
                end
                local sum, why = add_int(cur, ops[a])
                if not sum then return 'TXINVALID ' .. n .. ' ' .. why end
                types[j] = 'string'
                values[j] = sum
            end
        elseif name == 'PEXPIRE' then
            if tonumber(ops[a]) <= 0 then
                types[j] = 'none'
                values[j] = nil
            end
        else
            local want = TYPE_OF[name]
            if not want then return 'TXINVALID ' .. n .. ' unknown staged command ' .. name end
            local t = type_of(j)
            if t ~= 'any' then
                if t ~= 'none' and t ~= want then
                    return 'TXINVALID ' .. n .. ' WRONGTYPE Operation against a key holding the wrong kind of value'
                end
                -- A removal may empty (and so delete) the key; without reading
                -- the data we cannot know, so its type stays what it was.
                if not (REMOVES[name] and t == 'none') then types[j] = want end
            end
        end
    end
    return nil
end

-- Runs the write-set; a failing command (a queued one, or any one whose key
-- an outside client changed since the vote) does not stop the others.
-- Returns the failures, each '<write> <key>: <error>'. Runs of plain SETs
-- go out as one MSET (same effect, one call instead of many).
local function run_ops(base, ops, first)
    local failures = {}
    local mset = {}
    local mset_first = 0
    local function flush()
        if #mset > 0 then
            local res = redis.pcall('MSET', unpack(mset))
            if type(res) == 'table' and res.err then
                failures[#failures + 1] = mset_first .. ' ' .. mset[1] .. ': ' .. res.err
            end
            mset = {}
        end
    end
    for w in writes(base, ops, first) do
        local n, name, a, nargs = w.n, w.name, w.a, w.nargs
        if name == 'SET' and nargs == 1 and #mset < 1000 then
            if #mset == 0 then mset_first = n end
            mset[#mset + 1] = data_key(base, w.keys[1])
            mset[#mset + 1] = ops[a]
        else
            flush()
            local res
            if name == '*' then
                res = redis.pcall(unpack(ops, a, a + nargs - 1))
            else
                res = redis.pcall(name, data_key(base, w.keys[1]), unpack(ops, a, a + nargs - 1))
            end
            if type(res) == 'table' and res.err then
                local key = w.keys[1] and data_key(base, w.keys[1]) or ''
                failures[#failures + 1] = n .. ' ' .. key .. ': ' .. res.err
            end
        end
    end
    flush()
    return failures
end

-- Releases this transaction's locks and deletes its record: only called
-- while the record exists, so the write locks of its written keys are its own.
local function release(nread, txid)
    -- pcall: an outside client's value under the index must not stop a
    -- release halfway (prepare refuses such an index before writing).
    redis.pcall('SREM', K[4], K[1])
    local dels = { K[1] }
    for j = 1, triples(REC) do
        if j <= nread then
            redis.call('SREM', rlock_key(REC, j), txid)
        else
            dels[#dels + 1] = wlock_key(REC, j)
        end
    end
    chunked('DEL', dels)
end

-- prepare: KEYS = record, tombstone, receipt, record index, triples;
-- ARGV = txid, nread, key list (client-built blob, kept for recovery), the
-- coordinator's log id (empty: none), the client's clock when it sent the
-- call (µs), the most it may be late (ms), write-set...
-- A prepare later than that is refused (TXLATE): the tombstone of an abort
-- lives that long, so a prepare that could outlive it never lands.
-- The record also keeps the server's TIME (microseconds): recovery measures
-- a record's age by the store's own clock, never a client's.
local function prepare(keys, args)
    K = keys
    local txid = args[1]
    local nread = tonumber(args[2])
    local now = redis.call('TIME')
    local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
    local sent, late = tonumber(args[5]), tonumber(args[6])
    if not sent or not late or now_us - sent > late * 1000 then
        return redis.error_reply('TXLATE the prepare arrived later than the tombstone of an abort would last')
    end
    -- One EXISTS probes the tombstone, the record, the receipt and every
    -- lock at once.
    local refused = check_locks(REC, nread, txid, { keys[1], keys[2], keys[3] })
    if refused == nil then
        local it = redis.call('TYPE', keys[4])['ok']
        if it ~= 'none' and it ~= 'set' then refused = 'TXLOCKTYPE 0 write ' .. it end
    end
    if refused == nil then refused = validate(REC, args, 7) end
    if refused then return redis.error_reply(refused) end
    local wlocks = {}
    for j = 1, triples(REC) do
        if j <= nread then
            redis.call('SADD', rlock_key(REC, j), txid)
        else
            wlocks[#wlocks + 1] = wlock_key(REC, j)
            wlocks[#wlocks + 1] = txid
        end
    end
    chunked('MSET', wlocks)
    local ops = {}
    for k = 7, #args do ops[#ops + 1] = args[k] end
    local at = now[1] .. string.format('%06d', tonumber(now[2]))
    redis.call('HSET', keys[1], 'k', args[3], 'w', cmsgpack.pack(ops), 'l', args[4], 't', at)
    redis.call('SADD', keys[4], keys[1])
    return 1
end

-- apply: KEYS = record, tombstone, receipt, record index, triples; ARGV = txid, nread,
-- receipt TTL (ms). Replays the write-set, releases, and leaves the receipt.
-- Without a record: APPLIED (the receipt: applied before), ABORTED (a
-- tombstone) or LOST (neither).
local function apply(keys, args)
    K = keys
    local packed = redis.call('HGET', keys[1], 'w')
    if not packed then
        if redis.call('EXISTS', keys[3]) > 0 then return redis.status_reply('APPLIED') end
        if redis.call('EXISTS', keys[2]) > 0 then return redis.status_reply('ABORTED') end
        return redis.status_reply('LOST')
    end
    local failures = run_ops(REC, cmsgpack.unpack(packed), 1)
    release(tonumber(args[2]), args[1])
    redis.call('SET', keys[3], '1', 'PX', args[3])
    return failures
end

-- abort: KEYS = record, tombstone, receipt, record index, triples; ARGV = txid, nread,
-- tombstone TTL (ms). Releases what a prepare took (if it ran) and leaves a
-- tombstone so a prepare arriving late refuses. Returns 1 (a prepare was
-- released), 0 (none), or APPLIED (status: no record but a receipt; it was
-- committed and is left so, with no tombstone).
local function abort(keys, args)
    K = keys
    local had = redis.call('EXISTS', keys[1])
    if had == 1 then
        release(tonumber(args[2]), args[1])
    elseif redis.call('EXISTS', keys[3]) > 0 then
        return redis.status_reply('APPLIED')
    end
    redis.call('SET', keys[2], '1', 'PX', args[3])
    return had
end

-- commit: one phase. KEYS = triples; ARGV = txid, nread, write-set...
-- Check, validate and write in one call (inside the client's WATCH/MULTI/EXEC
-- when it read anything).
local function commit(keys, args)
    K = keys
    local nread = tonumber(args[2])
    local refused = check_locks(0, nread, args[1]) or validate(0, args, 3)
    if refused then return redis.error_reply(refused) end
    return run_ops(0, args, 3)
end

-- release_orphan: KEYS = a lock key, then the two names the holder's
-- record can have (under the lock's tag, and under the empty tag); ARGV =
-- holder txid, write|read. A lock whose holder has no record can never be
-- released by apply or abort (they release only while the record exists):
-- it is an orphan (left by a prepare of a tm before version 2 that failed
-- halfway, or by a record deleted behind tm's back). Removes the holder
-- from the lock if, atomically, it still holds it and has no record.
-- Returns 1 if it did.
local function release_orphan(keys, args)
    if redis.call('EXISTS', keys[2], keys[3]) > 0 then return 0 end
    if args[2] == 'write' then
        if redis.call('TYPE', keys[1])['ok'] ~= 'string' then return 0 end
        if redis.call('GET', keys[1]) ~= args[1] then return 0 end
        redis.call('DEL', keys[1])
        return 1
    end
    if redis.call('TYPE', keys[1])['ok'] ~= 'set' then return 0 end
    return redis.call('SREM', keys[1], args[1])
end

redis.register_function('tm_v2_prepare', prepare)
redis.register_function{function_name = 'tm_v2_apply', callback = apply, flags = {'allow-oom'}}
redis.register_function{function_name = 'tm_v2_abort', callback = abort, flags = {'allow-oom'}}
redis.register_function('tm_v2_commit', commit)
redis.register_function{function_name = 'tm_v2_release_orphan', callback = release_orphan, flags = {'allow-oom'}}
