{{/*
Partials: the guard as pieces of a pod spec, one template per piece (as Linkerd's
partials.proxy). The standalone Deployment uses them, and so can any other chart that has this
chart as a dependency, to inject the guard beside its own model container:

  {{- $guard := dict "Values" (index .Values "inference-guard") "Release" .Release }}
  annotations:  {{- include "inference-guard.podAnnotations" $guard | nindent 8 }}
  securityContext: {{- include "inference-guard.podSecurityContext" $guard | nindent 8 }}
  initContainers: {{- include "inference-guard.initContainers" $guard | nindent 8 }}
  containers:
    - name: model ...              # binds 127.0.0.1:<inference-guard.model.port>
    {{- include "inference-guard.containers" $guard | nindent 8 }}
  volumes: {{- include "inference-guard.volumes" $guard | nindent 8 }}

"inference-guard.container" is the guard container itself (a one-item list);
"inference-guard.containers" / "inference-guard.initContainers" place it (and the profile
copier) according to guard.nativeSidecar, so a parent need not know the mode.
*/}}

{{- define "inference-guard.hardenedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pod-level security context: fsGroup makes the 0440 secret files readable by the guard. */}}
{{- define "inference-guard.podSecurityContext" -}}
runAsNonRoot: true
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pod annotations: restart on process-config change (not on policy change), scraping hints. */}}
{{- define "inference-guard.podAnnotations" -}}
checksum/config: {{ include "inference-guard.configChecksum" . }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.guard.adminPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{- define "inference-guard.container" -}}
- name: guard
  image: {{ include "inference-guard.image" (list .Values.guard.image (include "inference-guard.appVersion" .)) | quote }}
  imagePullPolicy: {{ .Values.guard.image.pullPolicy }}
  args: ["run", "--config", "{{ include "inference-guard.configDir" . }}/config.yaml"]
  {{- if .Values.guard.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  ports:
    - name: guard
      containerPort: {{ .Values.guard.port }}
      protocol: TCP
    - name: guard-admin
      containerPort: {{ .Values.guard.adminPort }}
      protocol: TCP
  env:
    - name: GUARD_HMAC_KEY_FILE
      value: {{ include "inference-guard.secretsDir" . }}/{{ .Values.secrets.keys.hmacKey }}
    {{- if .Values.admin.enabled }}
    - name: GUARD_ADMIN_TOKEN_FILE
      value: {{ include "inference-guard.secretsDir" . }}/{{ .Values.secrets.keys.adminToken }}
    {{- end }}
    {{- if .Values.redis.enabled }}
    - name: GUARD_REDIS_URL_FILE
      value: {{ include "inference-guard.secretsDir" . }}/{{ .Values.secrets.keys.redisUrl }}
    {{- end }}
    {{- include "inference-guard.integrityEnv" . | nindent 4 }}
    {{- include "inference-guard.accessEnv" . | nindent 4 }}
    {{- with .Values.guard.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- include "inference-guard.hardenedSecurityContext" . | nindent 4 }}
  resources:
    {{- toYaml .Values.guard.resources | nindent 4 }}
  startupProbe:
    httpGet:
      path: /livez
      port: guard-admin
    {{- toYaml .Values.guard.startupProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /livez
      port: guard-admin
    {{- toYaml .Values.guard.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: guard-admin
    {{- toYaml .Values.guard.readinessProbe | nindent 4 }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", "{{ .Values.guard.preStopSleepSeconds }}"]
  volumeMounts:
    - name: guard-config
      mountPath: {{ include "inference-guard.configDir" . }}
      readOnly: true
    - name: guard-policy
      mountPath: {{ include "inference-guard.policyDir" . }}
      readOnly: true
    - name: guard-secrets
      mountPath: {{ include "inference-guard.secretsDir" . }}
      readOnly: true
    {{- if ne .Values.profile.source "none" }}
    - name: guard-profile
      mountPath: {{ include "inference-guard.profileDir" . }}
      readOnly: true
    {{- end }}
    {{- include "inference-guard.integrityMounts" . | nindent 4 }}
    {{- include "inference-guard.accessMounts" . | nindent 4 }}
    - name: guard-tmp
      mountPath: /tmp
    {{- with .Values.guard.volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The init container that copies a profile out of an image into the guard-profile emptyDir. */}}
{{- define "inference-guard.profileCopier" -}}
{{- $img := .Values.profile.image -}}
- name: guard-profile
  image: {{ include "inference-guard.image" (list $img "latest") | quote }}
  imagePullPolicy: {{ $img.pullPolicy }}
  {{- if $img.command }}
  command: {{- toYaml $img.command | nindent 4 }}
  {{- else }}
  command: ["cp", "-R", "{{ trimSuffix "/" $img.path }}/.", "{{ include "inference-guard.profileDir" . }}/"]
  {{- end }}
  securityContext:
    {{- include "inference-guard.hardenedSecurityContext" . | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 32Mi
    limits:
      cpu: 500m
      memory: 128Mi
  volumeMounts:
    - name: guard-profile
      mountPath: {{ include "inference-guard.profileDir" . }}
{{- end }}

{{/* Init containers: the profile copier (image source), then the guard as a native sidecar. */}}
{{- define "inference-guard.initContainers" -}}
{{- if eq .Values.profile.source "image" }}
{{ include "inference-guard.profileCopier" . }}
{{- end }}
{{- if .Values.guard.nativeSidecar }}
{{ include "inference-guard.container" . }}
{{- end }}
{{- end }}

{{/* Regular containers contributed by the guard: the guard itself unless it is a native sidecar. */}}
{{- define "inference-guard.containers" -}}
{{- if not .Values.guard.nativeSidecar }}
{{- include "inference-guard.container" . }}
{{- end }}
{{- end }}

{{- define "inference-guard.volumes" -}}
- name: guard-config
  configMap:
    name: {{ include "inference-guard.configName" . }}
- name: guard-policy
  configMap:
    name: {{ include "inference-guard.policyName" . }}
- name: guard-secrets
  secret:
    secretName: {{ include "inference-guard.secretName" . }}
    defaultMode: 0440
- name: guard-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- $p := .Values.profile }}
{{- if eq $p.source "secret" }}
- name: guard-profile
  secret:
    secretName: {{ $p.secret.name }}
    defaultMode: 0440
    {{- with $p.secret.items }}
    items: {{- toYaml . | nindent 6 }}
    {{- end }}
{{- else if eq $p.source "pvc" }}
- name: guard-profile
  persistentVolumeClaim:
    claimName: {{ $p.pvc.claimName }}
    readOnly: true
{{- else if eq $p.source "image" }}
- name: guard-profile
  emptyDir:
    sizeLimit: {{ $p.sizeLimit }}
{{- end }}
{{- include "inference-guard.integrityVolumes" . }}
{{- include "inference-guard.accessVolumes" . }}
{{- end }}

{{/* The model container of the standalone Deployment: loopback-only, no declared ports. */}}
{{- define "inference-guard.modelContainer" -}}
{{- $m := .Values.model -}}
- name: model
  image: {{ include "inference-guard.image" (list $m.image "latest") | quote }}
  imagePullPolicy: {{ $m.image.pullPolicy }}
  {{- with $m.command }}
  command: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.args }}
  args: {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    {{- range $m.hostEnvNames }}
    - name: {{ . }}
      value: "127.0.0.1"
    {{- end }}
    {{- range $m.portEnvNames }}
    - name: {{ . }}
      value: {{ $m.port | quote }}
    {{- end }}
    {{- with $m.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $m.envFrom }}
  envFrom: {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $m.securityContext | nindent 4 }}
  resources:
    {{- toYaml $m.resources | nindent 4 }}
  {{- with $m.startupProbe }}
  startupProbe: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.livenessProbe }}
  livenessProbe: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.readinessProbe }}
  readinessProbe: {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model-tmp
      mountPath: /tmp
    {{- with $m.volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
