{{/*
CEL pieces of the admission policies (templates/admission.yaml). A "block" is one set of pod
settings of a run: spec.template, spec.aggregator, spec.evaluation or one spec.clients[] entry.
The helpers take a dict: b, the block as a CEL expression; p, its field path as a CEL string
expression; n, a name as a CEL string expression. Clients are named by key in field paths
(spec.clients[name=alice]): CEL before Kubernetes 1.32 has no list indices.
*/}}

{{/*
The trainer image a run gets when it names none: the CRD's default of spec.template.image
(ghcr.io/fedtune/trainer:<version>, the chart's appVersion; tests keep the three equal).
*/}}
{{- define "fedtune-operator.trainerImage" -}}
ghcr.io/fedtune/trainer:{{ .Chart.AppVersion }}
{{- end }}

{{/*
The user name the API server gives the operator's ServiceAccount.
*/}}
{{- define "fedtune-operator.operatorUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "fedtune-operator.serviceAccountName" . }}
{{- end }}

{{/*
How many distinct Secrets (PVCs) of one run the policy checks by name for a user who may not
get them all. Each authorization check costs 350000 of the 10000000 a policy may spend on one
request, so the checks are counted: 1 (pods) + 1 + 12 (Secrets) + 1 + 6 (claims) = 21.
*/}}
{{- define "fedtune-operator.secretChecks" -}}12{{- end }}
{{- define "fedtune-operator.claimChecks" -}}6{{- end }}

{{/* CEL list of strings: the fields of block b that only people who may create pods may set. */}}
{{- define "fedtune-operator.cel.podFields" -}}
(has({{ .b }}.serviceAccountName) ? [{{ .p }} + '.serviceAccountName'] : [])
+ {{ .b }}.?env.orValue([]).filter(e, has(e.valueFrom) && (has(e.valueFrom.secretKeyRef) || has(e.valueFrom.configMapKeyRef))).map(e, {{ .p }} + '.env[name=' + e.name + '].valueFrom')
+ ({{ .b }}.?tolerations.orValue([]).exists(t, t.?key.orValue('') == '') ? [{{ .p }} + '.tolerations'] : [])
{{- end }}

{{/* CEL list of strings: the Secrets that block b's env reads. */}}
{{- define "fedtune-operator.cel.envSecrets" -}}
{{ .b }}.?env.orValue([]).filter(e, e.?valueFrom.?secretKeyRef.?name.orValue('') != '').map(e, e.valueFrom.secretKeyRef.name)
{{- end }}

{{/* CEL list of strings: the fields of block b's env that read Secret n. */}}
{{- define "fedtune-operator.cel.envSecretFields" -}}
{{ .b }}.?env.orValue([]).filter(e, e.?valueFrom.?secretKeyRef.?name.orValue('') == {{ .n }}).map(e, {{ .p }} + '.env[name=' + e.name + '].valueFrom.secretKeyRef')
{{- end }}

{{/* CEL list of strings: every field of the run that names Secret n. */}}
{{- define "fedtune-operator.cel.secretFields" -}}
{{- $c := dict "b" "c" "p" "('spec.clients[name=' + c.name + ']')" "n" .n -}}
(object.spec.storage.?credentialsSecret.?name.orValue('') == {{ .n }} ? ['spec.storage.credentialsSecret'] : [])
+ (object.spec.?privacy.?noiseKeySecret.orValue('') == {{ .n }} ? ['spec.privacy.noiseKeySecret'] : [])
+ (object.spec.?evaluation.?storageCredentialsSecret.?name.orValue('') == {{ .n }} ? ['spec.evaluation.storageCredentialsSecret'] : [])
+ {{ include "fedtune-operator.cel.envSecretFields" (dict "b" "variables.template" "p" "'spec.template'" "n" .n) }}
+ {{ include "fedtune-operator.cel.envSecretFields" (dict "b" "variables.aggregator" "p" "'spec.aggregator'" "n" .n) }}
+ {{ include "fedtune-operator.cel.envSecretFields" (dict "b" "variables.evaluation" "p" "'spec.evaluation'" "n" .n) }}
+ object.spec.clients.map(c,
    (c.?credentialsSecret.?name.orValue('') == {{ .n }} ? [{{ $c.p }} + '.credentialsSecret'] : [])
    + (c.?signing.?secretName.orValue('') == {{ .n }} ? [{{ $c.p }} + '.signing.secretName'] : [])
    + (c.?storageCredentialsSecret.?name.orValue('') == {{ .n }} ? [{{ $c.p }} + '.storageCredentialsSecret'] : [])
    + {{ include "fedtune-operator.cel.envSecretFields" $c }}
  ).filter(fs, size(fs) > 0).map(fs, fs.join(', '))
{{- end }}

{{/* CEL bool: URI u (a CEL string expression) is pvc://<n>[/...]. */}}
{{- define "fedtune-operator.cel.onClaim" -}}
({{ .u }} == 'pvc://' + {{ .n }} || {{ .u }}.startsWith('pvc://' + {{ .n }} + '/'))
{{- end }}

{{/* CEL list of strings: every field of the run whose pvc:// URI is on claim n. */}}
{{- define "fedtune-operator.cel.claimFields" -}}
({{ include "fedtune-operator.cel.onClaim" (dict "u" "object.spec.baseModel" "n" .n) }} ? ['spec.baseModel'] : [])
+ ({{ include "fedtune-operator.cel.onClaim" (dict "u" "object.spec.?tokenizer.orValue('')" "n" .n) }} ? ['spec.tokenizer'] : [])
+ ({{ include "fedtune-operator.cel.onClaim" (dict "u" "variables.evaluation.?dataUri.orValue('')" "n" .n) }} ? ['spec.evaluation.dataUri'] : [])
+ object.spec.clients.filter(c, {{ include "fedtune-operator.cel.onClaim" (dict "u" "c.dataUri" "n" .n) }}).map(c, 'spec.clients[name=' + c.name + '].dataUri')
{{- end }}

{{/* CEL bool: image i (a CEL string expression) matches admission.allowedImages. */}}
{{- define "fedtune-operator.cel.imageAllowed" -}}
{{ toJson .allowed }}.exists(a, a.endsWith('/') ? {{ .i }}.startsWith(a) : (a.startsWith('sha256:') ? {{ .i }}.endsWith('@' + a) : {{ .i }} == a))
{{- end }}

{{/* CEL list of strings: block b's serviceAccountName when admission.allowedServiceAccounts
does not list it. */}}
{{- define "fedtune-operator.cel.badServiceAccount" -}}
({{ .b }}.?serviceAccountName.orValue('') != '' && !({{ .b }}.serviceAccountName in {{ toJson .allowed }}) ? [{{ .p }} + '.serviceAccountName: ' + {{ .b }}.serviceAccountName] : [])
{{- end }}

{{/* CEL list of strings: block b's env vars read from Secrets. */}}
{{- define "fedtune-operator.cel.secretEnvFields" -}}
{{ .b }}.?env.orValue([]).filter(e, has(e.valueFrom) && has(e.valueFrom.secretKeyRef)).map(e, {{ .p }} + '.env[name=' + e.name + '].valueFrom.secretKeyRef')
{{- end }}

{{/* CEL list of strings: block b's tolerations whose key admission.allowedTolerationKeys does
not list (a toleration without a key tolerates every taint). */}}
{{- define "fedtune-operator.cel.badTolerations" -}}
{{ .b }}.?tolerations.orValue([]).filter(t, !(t.?key.orValue('') in {{ toJson .allowed }})).map(t, {{ .p }} + '.tolerations: ' + (t.?key.orValue('') == '' ? 'every taint' : t.key))
{{- end }}

{{/* The run-wide form of a per-block list: fixed blocks and every client, flattened. */}}
{{- define "fedtune-operator.cel.allBlocks" -}}
{{- $args := . -}}
{{ include .helper (merge (dict "b" "variables.template" "p" "'spec.template'") $args) }}
+ {{ include .helper (merge (dict "b" "variables.aggregator" "p" "'spec.aggregator'") $args) }}
+ {{ include .helper (merge (dict "b" "variables.evaluation" "p" "'spec.evaluation'") $args) }}
+ object.spec.clients.map(c, {{ include .helper (merge (dict "b" "c" "p" "('spec.clients[name=' + c.name + ']')") $args) }}).filter(fs, size(fs) > 0).map(fs, fs.join(', '))
{{- end }}
