{{/*
The chart's name, truncated to the 63 characters a label value allows.
*/}}
{{- define "fedtune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: the base of every object name. A release called "fedtune" gives
"fedtune-operator", not "fedtune-fedtune-operator".
*/}}
{{- define "fedtune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains .Release.Name $name }}
{{- $name | trunc 63 | trimSuffix "-" }}
{{- else if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedtune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the operator's pods. Never change them: a Deployment's selector is immutable.
*/}}
{{- define "fedtune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedtune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The standard labels of every object of the chart.
*/}}
{{- define "fedtune-operator.labels" -}}
helm.sh/chart: {{ include "fedtune-operator.chart" . }}
{{ include "fedtune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fedtune
{{- end }}

{{- define "fedtune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedtune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image: repository@digest when a digest is given, else repository:tag (the tag
defaults to the chart's appVersion).
*/}}
{{- define "fedtune-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's command line. Written out in full (not left to the image's ENTRYPOINT) because
every flag comes from the values, and because a node that cannot read image metadata (the
devcluster's process kubelet) runs exactly this.
*/}}
{{- define "fedtune-operator.command" -}}
- fedtune
- operator
{{- if eq .Values.mode "site" }}
- --mode=site
{{- end }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
- --liveness-port={{ .Values.operator.livenessPort }}
- --metrics-port={{ ternary .Values.metrics.port 0 .Values.metrics.enabled }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- end }}

{{/*
What the operator does against the API, and nothing more. The same rules go into the ClusterRole
(cluster mode) and into the Role of each watched namespace (namespaced mode). No Secrets: Jobs get
their credentials through secretKeyRef, which the kubelet resolves, never the operator.
- federatedfinetunes: get (reconcile reads), list/watch (kopf), patch (kopf's finalizer and
  annotations), delete (ttlSecondsAfterFinished removes a finished run);
- federatedfinetunes/status: update (the operator replaces the status, guarded by
  resourceVersion). No patch: kopf patches status only to store a handler's return value, and
  fedtune's handlers return nothing (kopf's own state lives in annotations);
- jobs: the client, aggregator and cleanup Jobs, created, watched (kopf), patched (suspend and
  resume) and deleted (superseded attempts, finished runs);
- pods: list and watch, for the termination message (the summary) of a finished Job's pod: an
  index of how each run's trainers ended, listed when it lags behind the Job;
- persistentvolumeclaims: create, the model cache claims of spec.modelCache.mode perClient
  (owned by the run, so the garbage collector deletes them; the operator never does), and get,
  to tell this run's existing claim from one a deleted run of the same name left behind;
- events: create, the run's events (`kubectl describe fft`);
- networkpolicies: create, and patch to bring an existing one up to date, the NetworkPolicy of a
  run's pods (spec.networkPolicy); list and watch, so that one already as wanted is not patched
  before every Job. Nothing to delete: the policy is owned by its run and the garbage collector
  deletes it with the run.
*/}}
{{- define "fedtune-operator.rules" -}}
{{- if eq .Values.mode "site" }}
{{- include "fedtune-operator.siteRules" . }}
{{- else }}
- apiGroups: ["fedtune.dev"]
  resources: ["federatedfinetunes"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["fedtune.dev"]
  resources: ["federatedfinetunes/status"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["create", "get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch", "list", "watch"]
{{- end }}
{{- end }}

{{/*
Site mode: a FederatedSite's reconcile reads it and replaces its status, lists and creates its
Jobs, reads their pods' termination messages, and posts events. No Secrets, no storage.
*/}}
{{- define "fedtune-operator.siteRules" -}}
- apiGroups: ["fedtune.dev"]
  resources: ["federatedsites"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["fedtune.dev"]
  resources: ["federatedsites/status"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
kopf lists and watches CRDs to find the resources it serves and to notice when they change.
*/}}
{{- define "fedtune-operator.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
Namespaced mode only: kopf lists and watches namespaces to notice when a watched one is created or
deleted (without it, kopf logs a 403 and assumes the listed namespaces exist).
*/}}
{{- define "fedtune-operator.namespaceRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{- define "fedtune-operator.subjects" -}}
- kind: ServiceAccount
  name: {{ include "fedtune-operator.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}
