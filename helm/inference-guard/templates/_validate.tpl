{{/*
Value combinations that cannot work. values.schema.json checks types and keys; these checks
relate keys to each other. Every rendered file includes this, so `helm template` fails early.
*/}}
{{- define "inference-guard.validate" -}}
{{- $v := .Values }}
{{- $ports := list (int $v.guard.port) (int $v.guard.adminPort) (int $v.model.port) }}
{{- if ne (len (uniq $ports)) 3 }}
{{- fail (printf "guard.port (%d), guard.adminPort (%d) and model.port (%d) must differ: the containers share one network namespace" (int $v.guard.port) (int $v.guard.adminPort) (int $v.model.port)) }}
{{- end }}
{{- if and $v.workload.enabled $v.kserve.enabled }}
{{- fail "kserve.enabled renders the model and the guard as a KServe InferenceService: set workload.enabled=false (the chart's own Deployment and Service would be a second copy)" }}
{{- end }}
{{- if and $v.kserve.enabled $v.guard.nativeSidecar }}
{{- fail "kserve.enabled needs guard.nativeSidecar=false: KServe routes the Service to the predictor's transformer-container, a regular container" }}
{{- end }}
{{- if and $v.kserve.enabled $v.injection.patch.enabled }}
{{- fail "injection.patch.enabled (a kustomize patch for your own Deployment) and kserve.enabled exclude each other" }}
{{- end }}
{{- if and $v.workload.enabled $v.injection.patch.enabled }}
{{- fail "injection.patch.enabled patches a Deployment of your own: set workload.enabled=false" }}
{{- end }}
{{- if and $v.injection.patch.enabled (empty $v.injection.podSelector) }}
{{- fail "injection.patch.enabled needs injection.podSelector: the labels of your Deployment's pods (its selector)" }}
{{- end }}
{{- if and $v.injection.patch.enabled (not $v.injection.patch.deployment) }}
{{- fail "injection.patch.enabled needs injection.patch.deployment (the name of the Deployment to add the guard to)" }}
{{- end }}
{{- if or $v.workload.enabled $v.kserve.enabled }}
{{- if not $v.model.image.repository }}
{{- fail "model.image.repository is required in standalone mode (workload.enabled=true) and with kserve.enabled; for injection into another chart set workload.enabled=false" }}
{{- end }}
{{- range (concat $v.model.command $v.model.args) }}
{{- if contains "0.0.0.0" (toString .) }}
{{- fail (printf "model.command/args contain %q: the model must bind 127.0.0.1 (use $(MODEL_HOST)); a NetworkPolicy cannot keep other pods off a port that listens on every address" (toString .)) }}
{{- end }}
{{- end }}
{{- range $v.model.env }}
{{- if and (has .name $v.model.hostEnvNames) (ne (toString .value) "127.0.0.1") }}
{{- fail (printf "model.env sets %s=%v but the chart pins it to 127.0.0.1: the model must bind loopback" .name .value) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $v.workload.enabled }}
{{- if $v.podDisruptionBudget.enabled }}
{{- fail "podDisruptionBudget.enabled needs workload.enabled=true: in injection mode the parent chart owns the workload and its PodDisruptionBudget" }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs workload.enabled=true: in injection mode the parent chart owns the workload and its autoscaler" }}
{{- end }}
{{- if and (not $v.kserve.enabled) (or $v.networkPolicy.enabled $v.metrics.service.enabled $v.metrics.serviceMonitor.enabled) (empty $v.injection.podSelector) }}
{{- fail "injection.podSelector is required in injection mode (workload.enabled=false) with networkPolicy, metrics.service or metrics.serviceMonitor: an empty selector would select every pod in the namespace" }}
{{- end }}
{{- end }}
{{- $owned := dict "GUARD_LISTEN" "guard.port" "GUARD_ADMIN_LISTEN" "guard.adminPort" "GUARD_UPSTREAM" "model.port" "GUARD_POLICY" "policy or existingPolicyConfigMap" "GUARD_PROFILE" "profile" "GUARD_HMAC_KEY" "secrets" "GUARD_ADMIN_TOKEN" "secrets" "GUARD_REDIS_URL" "redis" "GUARD_API_KEYS_FILE" "guard.access.apiKeys" "GUARD_JWT_JWKS_FILE" "guard.access.jwt" "GUARD_TLS_CERT_FILE" "guard.tls" "GUARD_TLS_KEY_FILE" "guard.tls" "GUARD_TLS_CLIENT_CA_FILE" "guard.tls" "GUARD_SINKS" "siem.sinks" "GUARD_SPOOL_DIR" "siem.spool" }}
{{- range $v.guard.env }}
{{- if hasKey $owned .name }}
{{- fail (printf "guard.env sets %s: use %s instead (the chart derives it; plain env would override the config file or put a secret in the pod spec)" .name (get $owned .name)) }}
{{- end }}
{{- end }}
{{- if and $v.policy $v.existingPolicyConfigMap }}
{{- fail "set either policy (inline text) or existingPolicyConfigMap, not both" }}
{{- end }}
{{- if $v.policy }}
{{- $parsed := fromYaml $v.policy }}
{{- if or (hasKey $parsed "Error") (empty $parsed) }}
{{- fail (printf "policy is not a YAML mapping: %v" (get $parsed "Error")) }}
{{- end }}
{{- end }}
{{- if and $v.secrets.existingSecret (or $v.secrets.hmacKey $v.secrets.adminToken) }}
{{- fail "secrets.existingSecret is set: put the HMAC key and admin token in that Secret, not in secrets.hmacKey/adminToken" }}
{{- end }}
{{- if $v.redis.enabled }}
{{- if and (not $v.redis.url) (not $v.secrets.existingSecret) }}
{{- fail (printf "redis.enabled needs redis.url, or secrets.existingSecret holding the URL under the key %q" $v.secrets.keys.redisUrl) }}
{{- end }}
{{- if and $v.redis.url $v.secrets.existingSecret }}
{{- fail (printf "redis.url is ignored with secrets.existingSecret: store the URL in that Secret under the key %q" $v.secrets.keys.redisUrl) }}
{{- end }}
{{- if and $v.redis.url (not (regexMatch "^rediss?://" $v.redis.url)) }}
{{- fail "redis.url must start with redis:// or rediss://" }}
{{- end }}
{{- else if $v.redis.url }}
{{- fail "redis.url is set but redis.enabled is false" }}
{{- end }}
{{- $p := $v.profile }}
{{- if and (eq $p.source "secret") (not $p.secret.name) }}
{{- fail "profile.source=secret needs profile.secret.name" }}
{{- end }}
{{- if and (eq $p.source "pvc") (not $p.pvc.claimName) }}
{{- fail "profile.source=pvc needs profile.pvc.claimName" }}
{{- end }}
{{- if and (eq $p.source "image") (not $p.image.repository) }}
{{- fail "profile.source=image needs profile.image.repository" }}
{{- end }}
{{- if and $v.guard.nativeSidecar (semverCompare "<1.29-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "guard.nativeSidecar needs Kubernetes >= 1.29 (restartPolicy: Always init containers); the target is %s" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- $pdb := $v.podDisruptionBudget }}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- $hpa := $v.autoscaling }}
{{- if $hpa.enabled }}
{{- if gt (int $hpa.minReplicas) (int $hpa.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) exceeds autoscaling.maxReplicas (%d)" (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
{{- end }}
{{- if not (dig "requests" "cpu" "" $v.model.resources) }}
{{- fail "autoscaling on CPU utilisation needs model.resources.requests.cpu (the HPA needs requests on every container)" }}
{{- end }}
{{- if not (dig "requests" "cpu" "" $v.guard.resources) }}
{{- fail "autoscaling on CPU utilisation needs guard.resources.requests.cpu" }}
{{- end }}
{{- end }}
{{- $grace := int (default 10 $v.guard.config.shutdown_grace) }}
{{- if and $v.workload.enabled (lt (int $v.workload.terminationGracePeriodSeconds) (add (int $v.guard.preStopSleepSeconds) $grace)) }}
{{- fail (printf "workload.terminationGracePeriodSeconds (%d) is shorter than guard.preStopSleepSeconds (%d) + shutdown_grace (%d): the pod would be killed mid-drain" (int $v.workload.terminationGracePeriodSeconds) (int $v.guard.preStopSleepSeconds) $grace) }}
{{- end }}
{{- include "inference-guard.accessValidate" . }}
{{- end }}
