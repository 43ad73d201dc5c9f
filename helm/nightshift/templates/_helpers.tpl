{{/*
Names, labels and the pieces every component's pod shares. A component is one of gateway,
scheduler, executor, finalizer; helpers that need it take (list "<component>" $).
*/}}

{{- define "nightshift.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name; a release whose name already contains the chart's is not repeated.
Component objects are "<fullname>-<component>", so it is cut to leave room for the suffix.
*/}}
{{- define "nightshift.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nightshift.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nightshift.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nightshift.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nightshift.labels" -}}
helm.sh/chart: {{ include "nightshift.chart" . }}
{{ include "nightshift.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nightshift
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (list "gateway" $) */}}
{{- define "nightshift.componentSelectorLabels" -}}
{{- $component := index . 0 -}}
{{- $ := index . 1 -}}
{{ include "nightshift.selectorLabels" $ }}
app.kubernetes.io/component: {{ $component }}
{{- end }}

{{/*
Labels of one component's objects. `nightshift.io/job` is the Prometheus job name the
ServiceMonitor gives the component's targets (its jobLabel): the alert rules and dashboards
match job="nightshift-<component>" here and in docker-compose alike.
*/}}
{{- define "nightshift.componentLabels" -}}
{{- $component := index . 0 -}}
{{- $ := index . 1 -}}
{{ include "nightshift.labels" $ }}
app.kubernetes.io/component: {{ $component }}
nightshift.io/job: nightshift-{{ $component }}
{{- end }}

{{- define "nightshift.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nightshift.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nightshift.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret holding the credentials: the user's, or the one this chart creates. */}}
{{- define "nightshift.secretName" -}}
{{- default (include "nightshift.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* The Secret holding the internal token: the user's, or the one this chart generates. */}}
{{- define "nightshift.internalSecretName" -}}
{{- default (printf "%s-internal" (include "nightshift.fullname" .)) .Values.internal.existingSecret }}
{{- end }}

{{/* The scheduler's gRPC endpoint, for the gateway and the finalizer (https:// with mTLS:
the scheduler's certificate must name <fullname>-scheduler). */}}
{{- define "nightshift.schedulerUrl" -}}
{{- printf "%s://%s-scheduler:%d" (ternary "https" "http" .Values.internal.tls.enabled) (include "nightshift.fullname" .) (int .Values.scheduler.service.port) }}
{{- end }}

{{/* The Secret holding the internal mTLS files (ca.crt, tls.crt, tls.key). */}}
{{- define "nightshift.internalTlsSecretName" -}}
{{- default (printf "%s-internal-tls" (include "nightshift.fullname" .)) .Values.internal.tls.existingSecret }}
{{- end }}

{{/* The port of a component's ops endpoints (/livez, /readyz, /metrics): the gateway's and
the scheduler's own ops listeners; the others on their listen port. */}}
{{- define "nightshift.opsPort" -}}
{{- $component := index . 0 -}}
{{- $ := index . 1 -}}
{{- if eq $component "gateway" }}{{ int $.Values.gateway.opsPort }}
{{- else if eq $component "scheduler" }}{{ int $.Values.scheduler.opsPort }}
{{- else }}{{ include "nightshift.port" (list $component $) }}
{{- end }}
{{- end }}

{{/* The listen port of a component (the gateway's API). */}}
{{- define "nightshift.port" -}}
{{- $component := index . 0 -}}
{{- $ := index . 1 -}}
{{- if eq $component "gateway" }}{{ int $.Values.gateway.service.port }}
{{- else if eq $component "scheduler" }}{{ int $.Values.scheduler.service.port }}
{{- else if eq $component "executor" }}9092
{{- else }}9093
{{- end }}
{{- end }}

{{/* An env var from the credentials Secret: (list "NAME" "secret key" optional $) */}}
{{- define "nightshift.secretEnv" -}}
{{- $name := index . 0 -}}
{{- $key := index . 1 -}}
{{- $optional := index . 2 -}}
{{- $ := index . 3 -}}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "nightshift.secretName" $ }}
      key: {{ $key }}
      optional: {{ $optional }}
{{- end }}

{{/*
The environment of a component: the config file, the connection settings, and the
credentials it needs (and no others), then the component's own settings and extraEnv.
NIGHTSHIFT_<SECTION>__<KEY> variables override nightshift.toml.
*/}}
{{- define "nightshift.env" -}}
{{- $component := index . 0 -}}
{{- $ := index . 1 -}}
{{- $v := $.Values -}}
- name: NIGHTSHIFT_CONFIG
  value: /etc/nightshift/nightshift.toml
- name: NIGHTSHIFT_{{ upper $component }}__LISTEN
  value: "0.0.0.0:{{ include "nightshift.port" (list $component $) }}"
- name: NIGHTSHIFT_STORAGE__ENDPOINT
  value: {{ $v.storage.endpoint | quote }}
- name: NIGHTSHIFT_STORAGE__REGION
  value: {{ $v.storage.region | quote }}
- name: NIGHTSHIFT_STORAGE__BUCKET
  value: {{ $v.storage.bucket | quote }}
- name: NIGHTSHIFT_STORAGE__FORCE_PATH_STYLE
  value: {{ $v.storage.forcePathStyle | quote }}
{{- with $v.storage.prefix }}
- name: NIGHTSHIFT_STORAGE__PREFIX
  value: {{ . | quote }}
{{- end }}
- name: NIGHTSHIFT_STATE__KEY_PREFIX
  value: {{ $v.state.keyPrefix | quote }}
{{ include "nightshift.secretEnv" (list "NIGHTSHIFT_STATE__URL" $v.secretKeys.stateUrl false $) }}
{{ include "nightshift.secretEnv" (list "NIGHTSHIFT_STORAGE__ACCESS_KEY_ID" $v.secretKeys.s3AccessKeyId true $) }}
{{ include "nightshift.secretEnv" (list "NIGHTSHIFT_STORAGE__SECRET_ACCESS_KEY" $v.secretKeys.s3SecretAccessKey true $) }}
{{- if ne $component "gateway" }}
- name: NIGHTSHIFT_QUEUE__PREFIX
  value: {{ $v.queue.prefix | quote }}
- name: NIGHTSHIFT_QUEUE__CONSUMER_TIMEOUT
  value: "{{ int $v.queue.consumerTimeoutSeconds }}s"
{{ include "nightshift.secretEnv" (list "NIGHTSHIFT_QUEUE__URL" $v.secretKeys.queueUrl false $) }}
{{- end }}
{{- if or (eq $component "gateway") (eq $component "finalizer") }}
- name: NIGHTSHIFT_{{ upper $component }}__SCHEDULER_URL
  value: {{ include "nightshift.schedulerUrl" $ | quote }}
{{- end }}
{{- if has $component (list "gateway" "scheduler" "finalizer") }}
- name: NIGHTSHIFT_INTERNAL__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "nightshift.internalSecretName" $ }}
      key: {{ $v.internal.existingSecretKey }}
      optional: false
{{- if $v.internal.tls.enabled }}
- name: NIGHTSHIFT_INTERNAL__TLS__CA
  value: /etc/nightshift-tls/ca.crt
- name: NIGHTSHIFT_INTERNAL__TLS__CERT
  value: /etc/nightshift-tls/tls.crt
- name: NIGHTSHIFT_INTERNAL__TLS__KEY
  value: /etc/nightshift-tls/tls.key
{{- end }}
{{- end }}
{{- if eq $component "gateway" }}
- name: NIGHTSHIFT_GATEWAY__OPS_LISTEN
  value: "0.0.0.0:{{ int $v.gateway.opsPort }}"
- name: NIGHTSHIFT_GATEWAY__HEADER_READ_TIMEOUT
  value: "{{ int $v.gateway.headerReadTimeoutSeconds }}s"
{{- end }}
{{- if eq $component "scheduler" }}
- name: NIGHTSHIFT_SCHEDULER__OPS_LISTEN
  value: "0.0.0.0:{{ int $v.scheduler.opsPort }}"
{{- with $v.metadata.schema }}
- name: NIGHTSHIFT_METADATA__SCHEMA
  value: {{ . | quote }}
{{- end }}
{{ include "nightshift.secretEnv" (list "NIGHTSHIFT_METADATA__URL" $v.secretKeys.metadataUrl false $) }}
{{ include "nightshift.secretEnv" (list "NIGHTSHIFT_SCHEDULER__BOOTSTRAP_API_KEY" $v.secretKeys.bootstrapApiKey true $) }}
{{- if $v.executor.keda.enabled }}
{{- /* KEDA scales on ready chunk tasks: the dispatcher's lookahead would keep that depth at 2 */}}
- name: NIGHTSHIFT_SCHEDULER__PIPELINE__MAX_QUEUED_CHUNKS_PER_MODEL
  value: "0"
{{- end }}
{{- end }}
{{- if eq $component "executor" }}
- name: NIGHTSHIFT_EXECUTOR__PREFETCH
  value: {{ $v.executor.prefetch | quote }}
- name: NIGHTSHIFT_EXECUTOR__SHUTDOWN_GRACE
  value: "{{ int $v.executor.shutdownGraceSeconds }}s"
{{- range (include "nightshift.upstreamKeyEnv" $ | fromJsonArray) }}
{{ include "nightshift.secretEnv" (list . . false $) }}
{{- end }}
{{- end }}
{{- if eq $component "finalizer" }}
- name: NIGHTSHIFT_FINALIZER__SHUTDOWN_GRACE
  value: "{{ int $v.finalizer.shutdownGraceSeconds }}s"
{{- end }}
{{- with (index $v $component).extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The upstream API key variables the executors get, as a JSON list (sorted, unique). */}}
{{- define "nightshift.upstreamKeyEnv" -}}
{{- $names := .Values.upstreamApiKeyEnv -}}
{{- if not .Values.existingSecret }}
{{- $names = concat $names (keys .Values.secrets.upstreamApiKeys) -}}
{{- end }}
{{- $names | uniq | sortAlpha | toJson -}}
{{- end }}

{{/*
The pod template of a component: (list "<component>" $). Probes: liveness on /livez (the
process makes progress), readiness on /readyz (its dependencies answer).
*/}}
{{- define "nightshift.podTemplate" -}}
{{- $component := index . 0 -}}
{{- $ := index . 1 -}}
{{- $c := index $.Values $component -}}
metadata:
  labels:
    {{- include "nightshift.componentLabels" (list $component $) | nindent 4 }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
    {{- if not $.Values.existingSecret }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") $ | sha256sum }}
    {{- end }}
    {{- if and (has $component (list "gateway" "scheduler" "finalizer")) (not $.Values.internal.existingSecret) }}
    {{- /* a rotated token (the Secret deleted, then an upgrade) restarts its users together */}}
    checksum/internal: {{ include (print $.Template.BasePath "/secret-internal.yaml") $ | sha256sum }}
    {{- end }}
    {{- with $c.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "nightshift.serviceAccountName" $ }}
  automountServiceAccountToken: false
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "nightshift.terminationGrace" (list $component $) }}
  containers:
    - name: {{ $component }}
      image: {{ include "nightshift.image" $ | quote }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      args: [{{ $component | quote }}]
      env:
        {{- include "nightshift.env" (list $component $) | nindent 8 }}
      ports:
        {{- if eq $component "scheduler" }}
        - name: grpc
          containerPort: {{ include "nightshift.port" (list $component $) }}
          protocol: TCP
        - name: ops
          containerPort: {{ include "nightshift.opsPort" (list $component $) }}
          protocol: TCP
        {{- else if eq $component "gateway" }}
        - name: http
          containerPort: {{ include "nightshift.port" (list $component $) }}
          protocol: TCP
        - name: ops
          containerPort: {{ include "nightshift.opsPort" (list $component $) }}
          protocol: TCP
        {{- else }}
        - name: ops
          containerPort: {{ include "nightshift.port" (list $component $) }}
          protocol: TCP
        {{- end }}
      startupProbe:
        httpGet:
          path: /livez
          port: {{ include "nightshift.opsPort" (list $component $) }}
        {{- toYaml $.Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /livez
          port: {{ include "nightshift.opsPort" (list $component $) }}
        {{- toYaml $.Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: {{ include "nightshift.opsPort" (list $component $) }}
        {{- toYaml $.Values.probes.readiness | nindent 8 }}
      {{- if and (eq $component "gateway") (gt (int $c.preStopSleepSeconds) 0) }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ int $c.preStopSleepSeconds }}
      {{- end }}
      securityContext:
        {{- toYaml $.Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml $c.resources | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/nightshift
          readOnly: true
        {{- if eq $component "executor" }}
        - name: tmp
          mountPath: /tmp
        {{- end }}
        {{- if and $.Values.internal.tls.enabled (has $component (list "gateway" "scheduler" "finalizer")) }}
        {{- /* not under /etc/nightshift: a mount point inside the read-only ConfigMap volume */}}
        - name: internal-tls
          mountPath: /etc/nightshift-tls
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "nightshift.fullname" $ }}
    {{- if and $.Values.internal.tls.enabled (has $component (list "gateway" "scheduler" "finalizer")) }}
    {{- /* read at start: a renewed certificate takes effect when the pod restarts */}}
    - name: internal-tls
      secret:
        secretName: {{ include "nightshift.internalTlsSecretName" $ }}
        defaultMode: 0440
        items:
          - key: ca.crt
            path: ca.crt
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    {{- if eq $component "executor" }}
    {{- /* result lines beyond executor.result_memory_bytes spill to a temporary file */}}
    - name: tmp
      {{- if $c.tmpSizeLimit }}
      emptyDir:
        sizeLimit: {{ $c.tmpSizeLimit | quote }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
  {{- with $c.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Seconds between SIGTERM and SIGKILL. Executors and the finalizer get their shutdown grace
(the time running work may take to finish) plus 30 s: the process re-publishes what is left and
exits at most 15 s after the grace (the queue worker's SHUTDOWN_MARGIN), the rest is slack.
*/}}
{{- define "nightshift.terminationGrace" -}}
{{- $component := index . 0 -}}
{{- $ := index . 1 -}}
{{- $c := index $.Values $component -}}
{{- if hasKey $c "shutdownGraceSeconds" }}{{ add (int $c.shutdownGraceSeconds) 30 }}
{{- else }}{{ int $c.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
