{{- /* Names: the release's name (fullnameOverride replaces it; nameOverride is appended to it
       and names the app in the labels), at most 63 characters. */ -}}
{{- define "tqo.name" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if .Values.nameOverride -}}
{{- printf "%s-%s" .Release.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- define "tqo.appName" -}}{{ default "taskqueue-operator" .Values.nameOverride | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "tqo.labels" -}}
app.kubernetes.io/name: {{ include "tqo.appName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "tqo.selector" -}}
app.kubernetes.io/name: {{ include "tqo.appName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- /* The operator's ServiceAccount: the chart's (serviceAccount.create), or one that exists. */ -}}
{{- define "tqo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tqo.name" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: the ServiceAccount to run as, when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
{{- /* registry/repository, then @digest or :tag (default: the chart's appVersion). */ -}}
{{- define "tqo.image" -}}
{{- with .Values.image.registry }}{{ . }}/{{ end }}{{ .Values.image.repository }}
{{- if .Values.image.digest }}@{{ .Values.image.digest }}{{ else }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{ end }}
{{- end -}}
{{- /* The watched namespaces, comma-separated (empty: all): watchNamespaces plus watchNamespace. */ -}}
{{- define "tqo.watchNamespaces" -}}
{{- $ns := .Values.watchNamespaces | default list -}}
{{- if .Values.watchNamespace }}{{ $ns = append $ns .Values.watchNamespace }}{{ end -}}
{{- join "," ($ns | uniq) -}}
{{- end -}}
