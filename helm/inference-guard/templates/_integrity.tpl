{{/*
Model integrity (canary queries, signed model files): the guard's env, mounts and volumes for it, and the
checks on its values. _partials.tpl includes the three pieces; configmap-integrity.yaml runs the checks.
All mounts are read-only: the guard reads the canary set, the public key and the model files, never writes.
*/}}

{{- define "inference-guard.canariesDir" -}}/etc/inference-guard/canaries{{- end }}
{{- define "inference-guard.modelKeyDir" -}}/etc/inference-guard/model-key{{- end }}
{{- define "inference-guard.modelDir" -}}/etc/inference-guard/model{{- end }}

{{- define "inference-guard.integrityName" -}}
{{- printf "%s-integrity" (include "inference-guard.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{/* GUARD_CANARIES: the mount, or a directory inside a PVC. */}}
{{- define "inference-guard.canariesPath" -}}
{{- $c := .Values.integrity.canaries }}
{{- if and (eq $c.source "pvc") $c.pvc.path }}
{{- printf "%s/%s" (include "inference-guard.canariesDir" .) (trimAll "/" $c.pvc.path) }}
{{- else }}
{{- include "inference-guard.canariesDir" . }}
{{- end }}
{{- end }}

{{- define "inference-guard.integrityEnv" -}}
{{- $i := .Values.integrity }}
{{- if ne $i.canaries.source "none" }}
- name: GUARD_CANARIES
  value: {{ include "inference-guard.canariesPath" . | quote }}
- name: GUARD_CANARY_INTERVAL
  value: {{ $i.canaries.interval | toString | quote }}
{{- end }}
{{- if $i.signing.enabled }}
- name: GUARD_MODEL_DIR
  value: {{ (ternary (printf "%s/%s" (include "inference-guard.modelDir" .) (trimAll "/" $i.signing.modelPath)) (include "inference-guard.modelDir" .) (ne $i.signing.modelPath "")) | quote }}
- name: GUARD_MODEL_PUBLIC_KEY_FILE
  value: {{ printf "%s/%s" (include "inference-guard.modelKeyDir" .) $i.signing.publicKeyKey | quote }}
{{- end }}
{{- end }}

{{- define "inference-guard.integrityMounts" -}}
{{- $i := .Values.integrity }}
{{- if ne $i.canaries.source "none" }}
- name: guard-canaries
  mountPath: {{ include "inference-guard.canariesDir" . }}
  readOnly: true
{{- end }}
{{- if $i.signing.enabled }}
- name: guard-model-key
  mountPath: {{ include "inference-guard.modelKeyDir" . }}
  readOnly: true
- name: {{ $i.signing.modelVolume }}
  mountPath: {{ include "inference-guard.modelDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod volumes contributed by integrity (the model volume itself belongs to the model's pod spec). */}}
{{- define "inference-guard.integrityVolumes" -}}
{{- $i := .Values.integrity }}
{{- $c := $i.canaries }}
{{- if eq $c.source "secret" }}
- name: guard-canaries
  secret:
    secretName: {{ $c.secret.name }}
    defaultMode: 0440
    {{- with $c.secret.items }}
    items: {{- toYaml . | nindent 6 }}
    {{- end }}
{{- else if eq $c.source "configMap" }}
- name: guard-canaries
  configMap:
    name: {{ $c.configMap.name }}
    {{- with $c.configMap.items }}
    items: {{- toYaml . | nindent 6 }}
    {{- end }}
{{- else if eq $c.source "pvc" }}
- name: guard-canaries
  persistentVolumeClaim:
    claimName: {{ $c.pvc.claimName }}
    readOnly: true
{{- end }}
{{- if $i.signing.enabled }}
- name: guard-model-key
  configMap:
    name: {{ default (include "inference-guard.integrityName" .) $i.signing.existingConfigMap }}
    items:
      - key: {{ $i.signing.publicKeyKey }}
        path: {{ $i.signing.publicKeyKey }}
{{- end }}
{{- end }}

{{- define "inference-guard.validateIntegrity" -}}
{{- $v := .Values }}
{{- $i := $v.integrity }}
{{- $c := $i.canaries }}
{{- if and (eq $c.source "secret") (not $c.secret.name) }}
{{- fail "integrity.canaries.source=secret needs integrity.canaries.secret.name" }}
{{- end }}
{{- if and (eq $c.source "configMap") (not $c.configMap.name) }}
{{- fail "integrity.canaries.source=configMap needs integrity.canaries.configMap.name" }}
{{- end }}
{{- if and (eq $c.source "pvc") (not $c.pvc.claimName) }}
{{- fail "integrity.canaries.source=pvc needs integrity.canaries.pvc.claimName" }}
{{- end }}
{{- $s := $i.signing }}
{{- if $s.enabled }}
{{- if not $s.modelVolume }}
{{- fail "integrity.signing.enabled needs integrity.signing.modelVolume: the name of the pod volume holding the signed model files" }}
{{- end }}
{{- if eq (len (compact (list $s.publicKey $s.existingConfigMap))) 0 }}
{{- fail "integrity.signing.enabled needs integrity.signing.publicKey (PEM text) or integrity.signing.existingConfigMap" }}
{{- end }}
{{- if and $s.publicKey $s.existingConfigMap }}
{{- fail "set either integrity.signing.publicKey or integrity.signing.existingConfigMap, not both" }}
{{- end }}
{{- if and $s.publicKey (not (contains "-----BEGIN PUBLIC KEY-----" $s.publicKey)) }}
{{- fail "integrity.signing.publicKey must be a PEM public key (-----BEGIN PUBLIC KEY-----), never the private key" }}
{{- end }}
{{- if $v.workload.enabled }}
{{- $names := list }}
{{- range $v.model.volumes }}{{ $names = append $names .name }}{{ end }}
{{- if not (has $s.modelVolume $names) }}
{{- fail (printf "integrity.signing.modelVolume %q is not among model.volumes (%s)" $s.modelVolume (join ", " $names)) }}
{{- end }}
{{- end }}
{{- else if or $s.publicKey $s.existingConfigMap $s.modelVolume }}
{{- fail "integrity.signing.publicKey/existingConfigMap/modelVolume are set but integrity.signing.enabled is false" }}
{{- end }}
{{- range $name := list "canaries" "canary_interval" "model_dir" "model_public_key_file" }}
{{- if hasKey $v.guard.config $name }}
{{- fail (printf "guard.config.%s: set it through integrity.* (the chart derives it and mounts the files)" $name) }}
{{- end }}
{{- end }}
{{- range $v.guard.env }}
{{- if has .name (list "GUARD_CANARIES" "GUARD_CANARY_INTERVAL" "GUARD_MODEL_DIR" "GUARD_MODEL_PUBLIC_KEY_FILE") }}
{{- fail (printf "guard.env sets %s: use integrity.* instead (the chart derives it and mounts the files)" .name) }}
{{- end }}
{{- end }}
{{- end }}
