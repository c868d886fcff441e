{{- define "tqo.name" -}}{{ .Release.Name }}{{- end -}}
{{- define "tqo.labels" -}}
app.kubernetes.io/name: taskqueue-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "tqo.selector" -}}
app.kubernetes.io/name: taskqueue-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
