{{/* Names and labels, as in the `helm create` scaffold. */}}
{{- define "rustmq-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A fully qualified name, truncated to 63 characters (some name fields are DNS labels). */}}
{{- define "rustmq-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "rustmq-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rustmq-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rustmq-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rustmq-operator.labels" -}}
helm.sh/chart: {{ include "rustmq-operator.chart" . }}
{{ include "rustmq-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rustmq
{{- end }}

{{- define "rustmq-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rustmq-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The rules the operator needs in every namespace it manages (least privilege: no wildcards,
     no secrets, no writes to the RustMQCluster spec). */}}
{{- define "rustmq-operator.namespacedRules" -}}
- apiGroups: [rustmq.io]
  resources: [rustmqclusters]
  verbs: [get, list, watch]
- apiGroups: [rustmq.io]
  resources: [rustmqclusters/status]
  verbs: [get, patch]
# Owner references with blockOwnerDeletion need update on the owner's finalizers.
- apiGroups: [rustmq.io]
  resources: [rustmqclusters/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps, serviceaccounts]
  verbs: [get, list, watch, create, patch, delete]
# The brokers' Role (leases and configmaps for cluster mode). RBAC lets a Role grant only what its creator holds, so the
# operator holds the brokers' verbs too (update on configmaps, the leases) instead of escalate.
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [update]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, watch, create, update]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
- apiGroups: [""]
  resources: [pods/eviction]
  verbs: [create]
# patch: storage growth; delete: only the claim of a broker drained empty by a scale-down, per
# storage.retentionPolicy.whenScaled (Drain, Delete), never on hibernation or cluster deletion.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, patch, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors, prometheusrules]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [cert-manager.io]
  resources: [certificates]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}

{{/* Cluster-scoped reads: the storage class (can claims grow?), and API discovery for kopf. */}}
{{- define "rustmq-operator.clusterRules" -}}
- apiGroups: [storage.k8s.io]
  resources: [storageclasses]
  verbs: [get, list]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- end }}

{{/* The namespaces the operator manages when it is not cluster-wide: watchNamespaces, or the
     release's own namespace. */}}
{{- define "rustmq-operator.namespaces" -}}
{{- if .Values.clusterWide }}
{{- if .Values.watchNamespaces }}
{{- fail "clusterWide: true manages every namespace; leave watchNamespaces empty" }}
{{- end }}
{{- toJson list }}
{{- else }}
{{- toJson (.Values.watchNamespaces | default (list .Release.Namespace)) }}
{{- end }}
{{- end }}
