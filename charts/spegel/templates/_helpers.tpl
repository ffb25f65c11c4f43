{{/* The chart's name, or nameOverride. */}}
{{- define "spegel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The base of every resource's name: the release's name, unless it already holds the chart's. */}}
{{- define "spegel.fullname" -}}
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

{{- define "spegel.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "spegel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spegel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spegel.labels" -}}
{{ include "spegel.selectorLabels" . }}
{{ include "spegel.releaseLabels" . }}
{{- end }}

{{/* What every resource is labelled with besides its selector labels. */}}
{{- define "spegel.releaseLabels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "spegel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spegel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "spegel.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The DNS name whose records are every spegel pod, ready or not: the bootstrap Service. */}}
{{- define "spegel.bootstrapDomain" -}}
{{- printf "%s-bootstrap.%s.svc.%s" (include "spegel.fullname" .) (include "spegel.namespace" .) (.Values.clusterDomain | trimSuffix ".") }}
{{- end }}

{{/* The address containerd on a node connects to: its own node's, at the node port. */}}
{{- define "spegel.mirrorTarget" -}}
{{- $host := default "$(NODE_IP)" .Values.service.registry.nodeIp }}
{{- printf "http://%s:%v" $host .Values.service.registry.nodePort }}
{{- end }}

{{/*
What every spegel pod shares, the post-delete hook's included: pull secrets, priority, the pod
security context and the placement, so the hook's pods reach exactly the DaemonSet's nodes.
*/}}
{{- define "spegel.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The post-delete hook's pods' labels, with their component: never all of the DaemonSet's
selector labels, so no spegel selector (DaemonSet, Services, NetworkPolicy) takes them in.
*/}}
{{- define "spegel.cleanupSelectorLabels" -}}
app.kubernetes.io/name: {{ include "spegel.name" .context }}-cleanup
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The Secret holding the cluster key, or "" when the DHT runs without one. */}}
{{- define "spegel.routerSecretName" -}}
{{- if .Values.spegel.routerSecret.existingSecret }}
{{- .Values.spegel.routerSecret.existingSecret }}
{{- else if .Values.spegel.routerSecret.create }}
{{- printf "%s-router-key" (include "spegel.fullname" .) }}
{{- end }}
{{- end }}
