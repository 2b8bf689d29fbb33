-- Redis Cluster: the writes of one hash tag, guarded by KEYS[1] = applied:{tag} in the same slot.
-- 'done': the guard is at or past the batch in every partition (applied before); 'conflict' with the
-- guard's offsets: past it in some partition but not all of it (other batch boundaries on a replay).
local p = cjson.decode(ARGV[1])
local field = ARGV[2]
local ns = ARGV[3]
local guard = KEYS[1]
local done, todo, cur = 0, 0, {}
for i, o in ipairs(p.off) do
  cur[i] = tonumber(redis.call('HGET', guard, field .. o[1]) or '-1')
  if cur[i] >= o[3] then done = done + 1 elseif cur[i] < o[2] then todo = todo + 1 end
end
if done + todo < #p.off or (done > 0 and todo > 0) then
  local at = {}
  for i, o in ipairs(p.off) do at[#at + 1] = tostring(o[1]); at[#at + 1] = tostring(cur[i]) end
  return {'conflict', unpack(at)}
end
if done > 0 then return {'done'} end
-- @writes
for _, o in ipairs(p.off) do redis.call('HSET', guard, field .. o[1], o[3]) end
redis.call('EXPIRE', guard, ARGV[4])
return {'ok'}
