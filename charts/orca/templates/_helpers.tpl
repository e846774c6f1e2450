{{- define "orca.fullname" -}}
{{- printf "%s-orca-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "orca.serviceAccountName" -}}
{{- default (include "orca.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "orca.labels" -}}
app.kubernetes.io/name: orca-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "orca.selectorLabels" -}}
app.kubernetes.io/name: orca-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
