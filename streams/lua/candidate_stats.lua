-- Serving reads for a whole candidate list in one call, answered as one JSON string: parsing a
-- pipeline's thousands of replies in Python cost ~5 ms per request, this ~0.1 ms.
local ids = cjson.decode(ARGV[1])
local reads = cjson.decode(ARGV[2])
local out = {{}, {}, {}}
for i = 1, #ids do out[1][i] = 0; out[2][i] = 0; out[3][i] = 0 end
for _, r in ipairs(reads) do
  local s = redis.call('ZMSCORE', r[1], unpack(ids))
  local col, w = out[r[2]], r[3]
  for i = 1, #ids do
    if s[i] then col[i] = col[i] + tonumber(s[i]) * w end
  end
end
return cjson.encode(out)
