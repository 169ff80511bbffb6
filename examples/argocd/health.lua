-- ArgoCD health check for rustmq.io/RustMQCluster, following the kstatus conventions
-- (observedGeneration, Ready, Reconciling, Stalled) and the Degraded condition that rustmq-operator writes.
-- Install it as resource.customizations.health.rustmq.io_RustMQCluster in argocd-cm.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local annotations = (obj.metadata and obj.metadata.annotations) or {}
if annotations["rustmq.io/pause-reconciliation"] == "true" then
  hs.status = "Suspended"
  hs.message = "Reconciliation is paused by the rustmq.io/pause-reconciliation annotation"
  return hs
end

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for rustmq-operator to observe the cluster"
  return hs
end

-- A status written for an older spec says nothing about the current one.
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for rustmq-operator to act on the latest spec"
  return hs
end

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "")
  return hs
end

-- The data (from the brokers' health report): partitions without a leader are always Degraded;
-- under-replicated ones only when nothing is in progress (a roll or a drain catches up by itself).
local degraded = condition("Degraded")
local reconciling = condition("Reconciling")
local converging = reconciling ~= nil and reconciling.status == "True"
if degraded ~= nil and degraded.status == "True" and (degraded.reason == "OfflinePartitions" or not converging) then
  hs.status = "Degraded"
  hs.message = (degraded.reason or "Degraded") .. ": " .. (degraded.message or "")
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  if ready.reason == "Hibernated" then
    hs.status = "Suspended"
  else
    hs.status = "Healthy"
  end
  hs.message = ready.message or ""
  return hs
end

-- A rolling restart, a drain or a scale-up is progress, not degradation.
hs.status = "Progressing"
if converging then
  hs.message = (reconciling.reason or "Reconciling") .. ": " .. (reconciling.message or "")
elseif ready ~= nil then
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
else
  hs.message = "Reconciling"
end
return hs
