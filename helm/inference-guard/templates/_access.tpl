{{/*
Access control (API keys, JWT), TLS on the guard port and SIEM sinks (docs/hardening.md, docs/siem.md):
the guard's env, config keys, mounts and volumes for them, and the checks on their values. _partials.tpl
and _helpers.tpl include the pieces; _validate.tpl runs the checks. Every credential is a Secret mounted
read-only as a directory (never subPath), so a rotated Secret reaches the guard, which reloads it. The spool
is the one writable mount: the root filesystem is read-only.
*/}}

{{- define "inference-guard.apiKeysDir" -}}/etc/inference-guard/api-keys{{- end }}
{{- define "inference-guard.jwksDir" -}}/etc/inference-guard/jwks{{- end }}
{{- define "inference-guard.tlsDir" -}}/etc/inference-guard/tls{{- end }}
{{- define "inference-guard.clientCADir" -}}/etc/inference-guard/tls-client-ca{{- end }}
{{- define "inference-guard.sinksDir" -}}/etc/inference-guard/sinks{{- end }}
{{- define "inference-guard.spoolDir" -}}/var/spool/inference-guard{{- end }}

{{/* Settings keys this part owns in config.yaml (merged by inference-guard.configYaml). */}}
{{- define "inference-guard.accessConfig" -}}
{{- $a := .Values.guard.access }}
{{- $t := .Values.guard.tls }}
{{- $out := dict }}
{{- if or $a.jwt.jwksSecret $a.jwt.jwksConfigMap }}
{{- $_ := set $out "jwt_jwks_file" (printf "%s/%s" (include "inference-guard.jwksDir" .) $a.jwt.jwksKey) }}
{{- with $a.jwt.issuer }}{{ $_ := set $out "jwt_issuer" . }}{{ end }}
{{- with $a.jwt.audience }}{{ $_ := set $out "jwt_audience" . }}{{ end }}
{{- $_ := set $out "jwt_session_claim" $a.jwt.sessionClaim }}
{{- end }}
{{- if $t.existingSecret }}
{{- $_ := set $out "tls_cert_file" (printf "%s/tls.crt" (include "inference-guard.tlsDir" .)) }}
{{- $_ := set $out "tls_key_file" (printf "%s/tls.key" (include "inference-guard.tlsDir" .)) }}
{{- if $t.clientCASecret }}
{{- $_ := set $out "tls_client_ca_file" (printf "%s/%s" (include "inference-guard.clientCADir" .) $t.clientCAKey) }}
{{- end }}
{{- end }}
{{- if .Values.siem.sinks }}
{{- $_ := set $out "sinks" .Values.siem.sinks }}
{{- end }}
{{- if ne .Values.siem.spool.type "none" }}
{{- $_ := set $out "spool_dir" (include "inference-guard.spoolDir" .) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{- define "inference-guard.accessEnv" -}}
{{- $k := .Values.guard.access.apiKeys }}
{{- if $k.existingSecret }}
- name: GUARD_API_KEYS_FILE
  value: {{ printf "%s/%s" (include "inference-guard.apiKeysDir" .) $k.key | quote }}
{{- end }}
{{- end }}

{{- define "inference-guard.accessMounts" -}}
{{- $a := .Values.guard.access }}
{{- $t := .Values.guard.tls }}
{{- if $a.apiKeys.existingSecret }}
- name: guard-api-keys
  mountPath: {{ include "inference-guard.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- if or $a.jwt.jwksSecret $a.jwt.jwksConfigMap }}
- name: guard-jwks
  mountPath: {{ include "inference-guard.jwksDir" . }}
  readOnly: true
{{- end }}
{{- if $t.existingSecret }}
- name: guard-tls
  mountPath: {{ include "inference-guard.tlsDir" . }}
  readOnly: true
{{- end }}
{{- if $t.clientCASecret }}
- name: guard-tls-client-ca
  mountPath: {{ include "inference-guard.clientCADir" . }}
  readOnly: true
{{- end }}
{{- range $i, $name := .Values.siem.secrets }}
- name: guard-sink-{{ $i }}
  mountPath: {{ include "inference-guard.sinksDir" $ }}/{{ $name }}
  readOnly: true
{{- end }}
{{- if ne .Values.siem.spool.type "none" }}
- name: guard-spool
  mountPath: {{ include "inference-guard.spoolDir" . }}
{{- end }}
{{- end }}

{{- define "inference-guard.accessVolumes" -}}
{{- $a := .Values.guard.access }}
{{- $t := .Values.guard.tls }}
{{- if $a.apiKeys.existingSecret }}
- name: guard-api-keys
  secret:
    secretName: {{ $a.apiKeys.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if $a.jwt.jwksSecret }}
- name: guard-jwks
  secret:
    secretName: {{ $a.jwt.jwksSecret }}
    defaultMode: 0440
{{- else if $a.jwt.jwksConfigMap }}
- name: guard-jwks
  configMap:
    name: {{ $a.jwt.jwksConfigMap }}
{{- end }}
{{- if $t.existingSecret }}
- name: guard-tls
  secret:
    secretName: {{ $t.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if $t.clientCASecret }}
- name: guard-tls-client-ca
  secret:
    secretName: {{ $t.clientCASecret }}
    defaultMode: 0440
{{- end }}
{{- range $i, $name := .Values.siem.secrets }}
- name: guard-sink-{{ $i }}
  secret:
    secretName: {{ $name }}
    defaultMode: 0440
{{- end }}
{{- $s := .Values.siem.spool }}
{{- if eq $s.type "emptyDir" }}
- name: guard-spool
  emptyDir:
    sizeLimit: {{ $s.sizeLimit }}
{{- else if eq $s.type "pvc" }}
- name: guard-spool
  persistentVolumeClaim:
    claimName: {{ $s.claimName }}
{{- end }}
{{- end }}

{{/* Value combinations that cannot work; included by inference-guard.validate. */}}
{{- define "inference-guard.accessValidate" -}}
{{- $a := .Values.guard.access }}
{{- $t := .Values.guard.tls }}
{{- $s := .Values.siem }}
{{- if and $a.jwt.jwksSecret $a.jwt.jwksConfigMap }}
{{- fail "guard.access.jwt: set jwksSecret or jwksConfigMap, not both" }}
{{- end }}
{{- if and (or $a.jwt.issuer $a.jwt.audience) (not (or $a.jwt.jwksSecret $a.jwt.jwksConfigMap)) }}
{{- fail "guard.access.jwt.issuer/audience need guard.access.jwt.jwksSecret or jwksConfigMap: without keys no token is verified" }}
{{- end }}
{{- if and $t.clientCASecret (not $t.existingSecret) }}
{{- fail "guard.tls.clientCASecret (mTLS) needs guard.tls.existingSecret: client certificates are checked only on a TLS port" }}
{{- end }}
{{- if and (eq $s.spool.type "pvc") (not $s.spool.claimName) }}
{{- fail "siem.spool.type=pvc needs siem.spool.claimName" }}
{{- end }}
{{- if and $s.sinks (eq $s.spool.type "none") }}
{{- fail "siem.sinks need a spool: set siem.spool.type to emptyDir or pvc (events wait there while a sink is down; the root filesystem is read-only)" }}
{{- end }}
{{- end }}
