{{/* Common labels; every object carries them. */}}
{{- define "gpusentry.labels" -}}
app.kubernetes.io/part-of: gpusentry
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gpusentry.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{/* The [kafka] section every component shares; $user is the component's principal. */}}
{{- define "gpusentry.kafkaToml" -}}
[kafka]
bootstrap_servers = {{ .root.Values.kafka.bootstrapServers | quote }}
security_protocol = {{ .root.Values.kafka.securityProtocol | quote }}
{{- if hasPrefix "SASL" .root.Values.kafka.securityProtocol }}
sasl_mechanism = {{ .root.Values.kafka.saslMechanism | quote }}
sasl_username = {{ .user | quote }}
{{- end }}
{{- if .root.Values.kafka.caSecret }}
ssl_cafile = "/etc/gpusentry/tls/ca.crt"
{{- end }}
partitions = {{ .root.Values.kafka.partitions }}
exact_high_watermark = {{ .root.Values.kafka.exactHighWatermark }}
{{- end -}}

{{/* The Kafka password from the component's existing Secret (never a value in the chart). */}}
{{- define "gpusentry.kafkaPasswordEnv" -}}
{{- if hasPrefix "SASL" .root.Values.kafka.securityProtocol }}
- name: GPUSENTRY_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .secret.name | quote }}, key: {{ .secret.key | quote }}}
{{- end }}
{{- end -}}

{{/* Restricted-profile container security (worker, forwarder, topic job). */}}
{{- define "gpusentry.restrictedContainer" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities: {drop: ["ALL"]}
{{- end -}}

{{- define "gpusentry.restrictedPod" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "gpusentry.caVolume" -}}
{{- if .Values.kafka.caSecret }}
- name: kafka-ca
  secret: {secretName: {{ .Values.kafka.caSecret | quote }}}
{{- end }}
{{- end -}}

{{- define "gpusentry.caMount" -}}
{{- if .Values.kafka.caSecret }}
- {name: kafka-ca, mountPath: /etc/gpusentry/tls, readOnly: true}
{{- end }}
{{- end -}}
