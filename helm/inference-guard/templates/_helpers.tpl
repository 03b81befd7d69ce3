{{/*
Names and labels. These helpers take a context with .Values and .Release (and .Chart when
rendered by this chart). A parent chart injecting the guard passes
  (dict "Values" (index .Values "inference-guard") "Release" .Release)
so .Chart may be absent: the chart name then falls back to "inference-guard".
*/}}

{{- define "inference-guard.chartName" -}}
{{- if .Chart -}}{{ .Chart.Name }}{{- else -}}inference-guard{{- end -}}
{{- end }}

{{- define "inference-guard.name" -}}
{{- default (include "inference-guard.chartName" .) .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inference-guard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "inference-guard.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Object names derived from the fullname; suffixes keep them under 63 characters. */}}
{{- define "inference-guard.configName" -}}
{{- printf "%s-config" (include "inference-guard.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "inference-guard.policyName" -}}
{{- if .Values.existingPolicyConfigMap }}
{{- .Values.existingPolicyConfigMap }}
{{- else }}
{{- printf "%s-policy" (include "inference-guard.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "inference-guard.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-secrets" (include "inference-guard.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "inference-guard.adminServiceName" -}}
{{- printf "%s-admin" (include "inference-guard.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "inference-guard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inference-guard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "inference-guard.chart" -}}
{{- if .Chart -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- else -}}
inference-guard
{{- end -}}
{{- end }}

{{- define "inference-guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inference-guard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inference-guard.labels" -}}
helm.sh/chart: {{ include "inference-guard.chart" . }}
{{ include "inference-guard.selectorLabels" . }}
{{- if and .Chart .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" }}
app.kubernetes.io/part-of: inference-guard
{{- end }}

{{/*
Labels that select the guarded pods: the chart's own pods in standalone mode, the parent
workload's pods (injection.podSelector) in injection mode.
*/}}
{{- define "inference-guard.podSelector" -}}
{{- if .Values.workload.enabled }}
{{- include "inference-guard.selectorLabels" . }}
{{- else if .Values.kserve.enabled }}
serving.kserve.io/inferenceservice: {{ include "inference-guard.fullname" . }}
{{- else }}
{{- toYaml .Values.injection.podSelector }}
{{- end }}
{{- end }}

{{/* image reference: repository, then @digest or :tag. Args: (list imageValues defaultTag). */}}
{{- define "inference-guard.image" -}}
{{- $img := index . 0 }}
{{- $defaultTag := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $defaultTag $img.tag | toString) }}
{{- end }}
{{- end }}

{{- define "inference-guard.appVersion" -}}
{{- if and .Chart .Chart.AppVersion }}{{ .Chart.AppVersion }}{{ else }}latest{{ end -}}
{{- end }}

{{/* Fixed mount points: the guard's process config reads these paths. */}}
{{- define "inference-guard.configDir" -}}/etc/inference-guard/config{{- end }}
{{- define "inference-guard.policyDir" -}}/etc/inference-guard/policy{{- end }}
{{- define "inference-guard.profileDir" -}}/etc/inference-guard/profile{{- end }}
{{- define "inference-guard.secretsDir" -}}/etc/inference-guard/secrets{{- end }}

{{/* The directory (or file) GUARD_PROFILE points at, "" when there is no profile. */}}
{{- define "inference-guard.profilePath" -}}
{{- $p := .Values.profile }}
{{- if eq $p.source "pvc" }}
{{- if $p.pvc.path }}{{ printf "%s/%s" (include "inference-guard.profileDir" .) (trimAll "/" $p.pvc.path) }}{{ else }}{{ include "inference-guard.profileDir" . }}{{ end }}
{{- else if ne $p.source "none" }}
{{- include "inference-guard.profileDir" . }}
{{- end }}
{{- end }}

{{/*
The process config (config.yaml): guard_agent.settings.Settings fields, no secrets. Both the
ConfigMap and the checksum/config pod annotation render it from here, so they always agree.
*/}}
{{- define "inference-guard.configYaml" -}}
# inference-guard process config (guard_agent.settings.Settings). Rendered by Helm; a change
# restarts the pod (checksum/config). Secrets come from GUARD_*_FILE, never from this file.
{{- $owned := dict
  "listen" (printf "0.0.0.0:%d" (int .Values.guard.port))
  "admin_listen" (printf "0.0.0.0:%d" (int .Values.guard.adminPort))
  "upstream" (printf "http://127.0.0.1:%d" (int .Values.model.port))
  "policy" (include "inference-guard.policyDir" .)
}}
{{- $profile := include "inference-guard.profilePath" . }}
{{- if $profile }}{{ $_ := set $owned "profile" $profile }}{{ end }}
{{- $owned = merge $owned (include "inference-guard.accessConfig" . | fromYaml) }}
{{- $config := merge $owned (deepCopy .Values.guard.config) }}
{{ toYaml $config }}
{{- end }}

{{- define "inference-guard.configChecksum" -}}
{{- include "inference-guard.configYaml" . | sha256sum }}
{{- end }}

{{/* The policy text: values.policy, or the shipped default. */}}
{{- define "inference-guard.policyYaml" -}}
{{- if .Values.policy }}
{{- .Values.policy }}
{{- else }}
{{- .Files.Get "files/policy.yaml" }}
{{- end }}
{{- end }}
