{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "ratatouille.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name if it already holds the chart name, else <release>-<chart>. */}}
{{- define "ratatouille.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ratatouille.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ratatouille.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ratatouille.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "ratatouille.labels" -}}
helm.sh/chart: {{ include "ratatouille.chart" . }}
{{ include "ratatouille.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ratatouille
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ratatouille.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ratatouille.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ratatouille.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The trainer image of child Jobs: trainer.image, else trainer.repository:trainer.tag. */}}
{{- define "ratatouille.trainerImage" -}}
{{- default (printf "%s:%s" .Values.trainer.repository (default .Chart.AppVersion .Values.trainer.tag)) .Values.trainer.image -}}
{{- end -}}

{{/* Fixed ports of the operator process (its defaults; set explicitly in its environment). */}}
{{- define "ratatouille.metricsPort" -}}{{ .Values.ports.metrics | default 9090 }}{{- end -}}
{{- define "ratatouille.livenessPort" -}}{{ .Values.ports.liveness | default 8080 }}{{- end -}}

{{/*
"true" when the Prometheus Operator objects should render: monitoring.enabled true, or
monitoring.enabled null/unset and the cluster serves monitoring.coreos.com/v1.
*/}}
{{- define "ratatouille.monitoring" -}}
{{- $enabled := .Values.monitoring.enabled -}}
{{- if kindIs "bool" $enabled -}}
{{- if $enabled -}}true{{- end -}}
{{- else if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}
true
{{- end -}}
{{- end -}}

{{- define "ratatouille.monitoringLabels" -}}
{{ include "ratatouille.labels" . }}
{{- with .Values.monitoring.additionalLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The namespaced rules the operator needs, shared by the ClusterRole and the per-namespace Roles. */}}
{{- define "ratatouille.namespacedRules" -}}
- apiGroups: ["ratatouille.dev"]
  resources: ["ratatouilleruns"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["ratatouille.dev"]
  resources: ["ratatouilleruns/status"]
  verbs: ["get", "patch", "update"]
# Child Jobs set blockOwnerDeletion on their ownerReference to the run.
- apiGroups: ["ratatouille.dev"]
  resources: ["ratatouilleruns/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Termination messages of failed training pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Its own Events (create); the Job controller's FailedCreate Events of its Jobs (list).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# A run's suspend holds its queued Jobs the way Kueue supports: their Workloads are deactivated
# (spec.active), never by flipping a queued Job's spec.suspend. Unused without Kueue.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
{{- end -}}
