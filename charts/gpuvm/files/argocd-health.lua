-- Argo CD health check for gpuvm.dev/GpuMachine, built on its standard Ready condition.
-- Install it in argocd-cm as resource.customizations.health.gpuvm.dev_GpuMachine
-- (charts/gpuvm/README.md). Lua 5.1 only: Argo CD runs it in gopher-lua.
--
--   Healthy      Ready=True, or phase Succeeded (the machine ran to completion)
--   Degraded     phase Failed; Scheduled=False (no node can take it: reason and message);
--                phase Running with Ready=False (e.g. the guest does not see its GPUs);
--                Ready=False with reason CrashLoopBackOff (restarts backing off)
--   Progressing  no status yet, status older than the spec, phase Pending, Scheduled,
--                Booting or Terminating, Ready Unknown or missing, Ready=False while the
--                guest's GPU check is awaited (AwaitingGpuCheck) or a spec change rolls
--                out (RollingOut)
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "Reason: message", or whichever of the two is there.
local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  if c.reason ~= nil and c.reason ~= "" and c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpuvm operator to pick the machine up"
  return hs
end

local phase = status.phase or ""
local ready = condition(status, "Ready")
local scheduled = condition(status, "Scheduled")

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the gpuvm operator to observe generation " .. tostring(generation)
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = status.message or describe(ready, "The machine failed")
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = status.message or "The machine ran to completion"
  return hs
end

if scheduled ~= nil and scheduled.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(scheduled, status.message or "No node can take the machine")
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Running")
  return hs
end

if ready ~= nil and ready.status == "False" and ready.reason == "CrashLoopBackOff" then
  hs.status = "Degraded"
  hs.message = describe(ready, "Restarts are backing off")
  return hs
end

if ready ~= nil and ready.status == "False"
    and (ready.reason == "AwaitingGpuCheck" or ready.reason == "RollingOut") then
  hs.status = "Progressing"
  hs.message = describe(ready, "Waiting")
  return hs
end

if phase == "Running" and ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready, "Running but not ready")
  return hs
end

hs.status = "Progressing"
if phase ~= "" then
  hs.message = describe(ready, status.message or ("Phase " .. phase))
else
  hs.message = describe(ready, "Waiting for the gpuvm operator")
end
return hs
