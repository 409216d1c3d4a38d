{{/* Chart name, overridable. */}}
{{- define "sftops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Base name of every object: "<release>-sftops", or the release name when it already contains the chart name. */}}
{{- define "sftops.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels every object of the release carries, without its component. */}}
{{- define "sftops.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "sftops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sftops
{{- end }}

{{/* Labels of the control plane's objects. */}}
{{- define "sftops.labels" -}}
{{ include "sftops.baseLabels" . }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/* Labels that select the plane's pods (stable across upgrades: never add to them). */}}
{{- define "sftops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sftops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/* The plane's ServiceAccount name. */}}
{{- define "sftops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sftops.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The job pods' ServiceAccount name (empty: the namespace's default account). */}}
{{- define "sftops.jobServiceAccountName" -}}
{{- if .Values.job.serviceAccount.create }}
{{- default (printf "%s-job" (include "sftops.fullname" .)) .Values.job.serviceAccount.name }}
{{- else }}
{{- .Values.job.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespace of the training Jobs. */}}
{{- define "sftops.jobNamespace" -}}
{{- default .Release.Namespace .Values.job.namespace }}
{{- end }}

{{/* Control-plane image reference. */}}
{{- define "sftops.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Job image reference. */}}
{{- define "sftops.jobImage" -}}
{{- printf "%s:%s" .Values.job.image.repository (default .Chart.AppVersion .Values.job.image.tag) }}
{{- end }}

{{/* URL the job pods post reports to: config.publicUrl, else the Service's in-cluster address. */}}
{{- define "sftops.planeUrl" -}}
{{- if .Values.config.publicUrl }}
{{- .Values.config.publicUrl | trimSuffix "/" }}
{{- else }}
{{- printf "http://%s.%s.svc.%s:%v" (include "sftops.fullname" .) .Release.Namespace .Values.clusterDomain .Values.service.port }}
{{- end }}
{{- end }}

{{/* Name of the SQLite volume's claim. */}}
{{- define "sftops.claimName" -}}
{{- default (printf "%s-data" (include "sftops.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/*
Combinations of values that cannot work, refused with a message that says what to change.
Included by the Deployment, which every install renders.
*/}}
{{- define "sftops.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (eq .Values.database.type "sqlite") }}
{{- fail (printf "replicaCount=%v needs database.type=postgres: SQLite on one volume serves a single replica. Set database.type=postgres and database.postgres.secretName (a Secret holding the PostgreSQL URL), or set replicaCount=1." .Values.replicaCount) }}
{{- end }}
{{- if and (eq .Values.database.type "postgres") (not .Values.database.postgres.secretName) }}
{{- fail "database.type=postgres needs database.postgres.secretName: the name of an existing Secret whose key database.postgres.secretKey holds the SQLAlchemy URL (postgresql+psycopg://user:password@host:5432/sftops)." }}
{{- end }}
{{- if and (eq .Values.config.auth "enabled") (not .Values.auth.tokensSecret) }}
{{- fail "config.auth=enabled needs auth.tokensSecret: the name of an existing Secret holding the tokens file (see `sftops token create`), or set config.auth=disabled for a demo." }}
{{- end }}
{{- if .Values.job.multiNode.enabled }}
{{- fail "job.multiNode.enabled=true: multi-node training is not implemented yet. Set it to false; a job trains on the GPUs of one node (resources.gpus)." }}
{{- end }}
{{- end }}

{{/* Labels the Kubernetes launcher puts on every job pod (base_labels in service/launchers/k8s_manifest.py). */}}
{{- define "sftops.jobPodLabels" -}}
app.kubernetes.io/name: sftops
app.kubernetes.io/component: job
app.kubernetes.io/managed-by: sftops
{{- end }}
