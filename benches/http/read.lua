-- wrk script: GET TYPE/ID, rotating over the references listed (one a line) in the file named
-- by the argument after `--`. Each wrk thread starts at a different offset.
local refs = {}
local next_index = 1

function init(args)
  local path = args[1]
  if path == nil then
    error("usage: wrk ... -s read.lua URL -- REFS_FILE")
  end
  for line in io.lines(path) do
    if #line > 0 then
      refs[#refs + 1] = line
    end
  end
  if #refs == 0 then
    error("no references in " .. path)
  end
  next_index = (math.random(#refs) - 1)
end

function request()
  next_index = next_index % #refs + 1
  return wrk.format("GET", "/" .. refs[next_index], { ["Accept"] = "application/fhir+json" })
end
