{{- define "kubetune.name" -}}kubetune{{- end -}}

{{- define "kubetune.fullname" -}}
{{- if contains "kubetune" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-kubetune" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.selector" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.pushgatewayUrl" -}}
{{- if .Values.metrics.pushgateway.deploy -}}
http://{{ include "kubetune.fullname" . }}-pushgateway.{{ .Release.Namespace }}.svc:9091
{{- else -}}
{{ .Values.metrics.pushgateway.url }}
{{- end -}}
{{- end -}}

{{/* The operator's RBAC rules: operator/kubetune_operator/rbac.py rules(kueue=...), kept equal by a test. */}}
{{- define "kubetune.rules" -}}
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "get"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- if .Values.kueue.enabled }}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/* The leader-election Lease: one per release, named like the operator. */}}
{{- define "kubetune.leaseName" -}}{{ include "kubetune.fullname" . }}-operator{{- end -}}

{{/* Leader election's rules (a Role in the release namespace): operator/kubetune_operator/rbac.py
lease_rules(), kept equal by a test. */}}
{{- define "kubetune.leaseRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ include "kubetune.leaseName" . | quote }}]
  verbs: ["get", "update"]
{{- end -}}
