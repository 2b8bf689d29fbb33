-- The writes of a payload (recstream.features.plan RedisOps.as_payload); `p` the payload, `ns` the
-- namespace. Not a script of its own: spliced where a script says "-- @writes".
for _, z in ipairs(p.z) do redis.call('ZINCRBY', ns .. z[1], z[3], z[2]) end
for _, x in ipairs(p.xat) do redis.call('EXPIREAT', ns .. x[1], x[2]) end
for _, t in ipairs(p.trim) do
  local k = ns .. t[1]
  if redis.call('ZCARD', k) > 2 * t[2] then redis.call('ZREMRANGEBYRANK', k, 0, -(t[2] + 1)) end
end
for _, s in ipairs(p.set) do redis.call('SET', ns .. s[1], s[2], 'EX', s[3]) end
for _, h in ipairs(p.hset) do
  local args = {}
  for f, v in pairs(h[2]) do args[#args + 1] = f; args[#args + 1] = v end
  redis.call('HSET', ns .. h[1], unpack(args))
  redis.call('EXPIRE', ns .. h[1], h[3])
end
