{{/* Chart name, possibly overridden. */}}
{{- define "gpuvm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name. */}}
{{- define "gpuvm.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "gpuvm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "gpuvm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpuvm
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "operator"). */}}
{{- define "gpuvm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpuvm.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "gpuvm.operator.name" -}}{{ include "gpuvm.fullname" . }}-operator{{- end }}
{{- define "gpuvm.node.name" -}}{{ include "gpuvm.fullname" . }}-node{{- end }}
{{- define "gpuvm.cleanup.name" -}}{{ include "gpuvm.fullname" . }}-cleanup{{- end }}

{{/* image: include with (dict "image" .Values.operator.image "ctx" $) */}}
{{- define "gpuvm.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The shim's log level: RUST_LOG-like levels only. */}}
{{- define "gpuvm.logLevel" -}}{{ .Values.logLevel }}{{- end }}

{{/* Tolerations of the node DaemonSet and the cleanup DaemonSet. */}}
{{- define "gpuvm.node.tolerations" -}}
- key: {{ .Values.gpuNode.taint.key | quote }}
  operator: Exists
  effect: {{ .Values.gpuNode.taint.effect }}
{{- with .Values.node.tolerations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Host paths seen from the installer container. The host's folders are mounted under
/host with the same layout, so one path string works on both sides.
*/}}
{{- define "gpuvm.installer.env" -}}
- name: GPUVM_HOST_ROOT
  value: /host
- name: GPUVM_HOST_DIR
  value: {{ .Values.installer.hostDir | quote }}
- name: GPUVM_SHIM_CONFIG_DIR
  value: {{ .Values.installer.shimConfigDir | quote }}
- name: GPUVM_CONTAINERD_CONFIG_DIR
  value: {{ .Values.installer.containerd.configDir | quote }}
- name: GPUVM_CONTAINERD_CONFIG_FILE
  value: {{ .Values.installer.containerd.configFile | quote }}
- name: GPUVM_CONTAINERD_DROP_IN
  value: {{ .Values.installer.containerd.dropIn | quote }}
- name: GPUVM_CONTAINERD_ADD_IMPORT
  value: {{ .Values.installer.containerd.addImport | quote }}
- name: GPUVM_CONTAINERD_RESTART
  value: {{ .Values.installer.containerd.restart | quote }}
- name: GPUVM_CONTAINERD_UNIT
  value: {{ .Values.installer.containerd.systemdUnit | quote }}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end }}

{{/*
Host mounts of the installer (install and cleanup), each justified:
- hostDir: where the shim, helpers, guest kernel and initramfs go (containerd starts
  the shim from there, the shim reads the guest image from there).
- shimConfigDir: the shim's config file, named by the drop-in's ConfigPath.
- containerd configDir: the drop-in, and the `imports` line when addImport is needed.
- /run/gpuvm: read-only, to see whether VMs still run before cleaning up.
The restart of containerd goes through hostPID + nsenter into PID 1's namespaces
(systemctl talks to the host's systemd), so no systemd socket is mounted.
*/}}
{{- define "gpuvm.installer.volumeMounts" -}}
- name: host-gpuvm-dir
  mountPath: {{ printf "/host%s" .Values.installer.hostDir }}
- name: host-shim-config
  mountPath: {{ printf "/host%s" .Values.installer.shimConfigDir }}
- name: host-containerd-config
  mountPath: {{ printf "/host%s" .Values.installer.containerd.configDir }}
- name: host-run-gpuvm
  mountPath: /host/run/gpuvm
  readOnly: true
- name: installer-files
  mountPath: /etc/gpuvm-installer
  readOnly: true
{{- end }}

{{- define "gpuvm.installer.volumes" -}}
- name: host-gpuvm-dir
  hostPath:
    path: {{ .Values.installer.hostDir }}
    type: DirectoryOrCreate
- name: host-shim-config
  hostPath:
    path: {{ .Values.installer.shimConfigDir }}
    type: DirectoryOrCreate
- name: host-containerd-config
  hostPath:
    path: {{ .Values.installer.containerd.configDir }}
    type: Directory
- name: host-run-gpuvm
  hostPath:
    path: /run/gpuvm
    type: DirectoryOrCreate
- name: installer-files
  configMap:
    name: {{ include "gpuvm.fullname" . }}-installer
    defaultMode: 0555
{{- end }}

{{/* Nodes the node DaemonSet (and the cleanup) run on. */}}
{{- define "gpuvm.node.selector" -}}
{{- if .Values.node.selector }}
{{- toYaml .Values.node.selector }}
{{- else -}}
gpuvm.dev/install: "true"
{{- end }}
{{- end }}

{{/* Nodes gpuvm Pods run on (RuntimeClass scheduling.nodeSelector). */}}
{{- define "gpuvm.gpuNode.selector" -}}
{{- if .Values.gpuNode.nodeSelector }}
{{- toYaml .Values.gpuNode.nodeSelector }}
{{- else -}}
gpuvm.dev/gpu-node: "true"
{{- end }}
{{- end }}
