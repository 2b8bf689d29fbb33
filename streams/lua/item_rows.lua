-- Item feature rows (HMGET of `fields`) for many items in one call, as one JSON string.
local ids = cjson.decode(ARGV[1])
local fields = cjson.decode(ARGV[2])
local prefix, suffix = ARGV[3], ARGV[4]
local out = {}
for i, id in ipairs(ids) do
  local v = redis.call('HMGET', prefix .. id .. suffix, unpack(fields))
  local row = {}
  for j = 1, #fields do row[j] = v[j] or cjson.null end
  out[i] = row
end
return cjson.encode(out)
