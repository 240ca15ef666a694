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
{{- define "gpuvm.installer.name" -}}{{ include "gpuvm.fullname" . }}-installer{{- end }}

{{/*
The user names the API server gives the operator's and the node agent's service
accounts: the admission policies (templates/admission.yaml) key on them.
*/}}
{{- define "gpuvm.operator.username" -}}system:serviceaccount:{{ .Release.Namespace }}:{{ include "gpuvm.operator.name" . }}{{- end }}
{{- define "gpuvm.node.username" -}}system:serviceaccount:{{ .Release.Namespace }}:{{ include "gpuvm.node.name" . }}{{- end }}

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
The shim's runtime folders on the host (shim/README.md `[host]`, node/README.md). Fixed:
the shim keeps its VMs' work dirs in /run/gpuvm/<sandbox-id>/ (not configurable), and
the cleanup sees all of these through its one /run/gpuvm mount. The same strings go into
shim.toml `[host]`, the node DaemonSet's hostPath volumes, the agent's --health-dir /
--gpu-check-dir (under /host) and the installer's env, so they cannot drift apart.
*/}}
{{- define "gpuvm.host.runDir" -}}/run/gpuvm{{- end }}
{{- define "gpuvm.host.lockDir" -}}{{ include "gpuvm.host.runDir" . }}/devices{{- end }}
{{- define "gpuvm.host.healthDir" -}}{{ include "gpuvm.host.runDir" . }}/health{{- end }}
{{- define "gpuvm.host.gpuCheckDir" -}}{{ include "gpuvm.host.runDir" . }}/gpu-check{{- end }}

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
- name: GPUVM_RUN_DIR
  value: {{ include "gpuvm.host.runDir" . | quote }}
- name: GPUVM_LOCK_DIR
  value: {{ include "gpuvm.host.lockDir" . | quote }}
- name: GPUVM_HEALTH_DIR
  value: {{ include "gpuvm.host.healthDir" . | quote }}
- name: GPUVM_GPU_CHECK_DIR
  value: {{ include "gpuvm.host.gpuCheckDir" . | quote }}
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
- /run/gpuvm: to see whether VMs still run before cleaning up. Read-only for the
  installer; read-write only for the cleanup, which removes the shim's empty runtime
  folders (devices/, gpu-check/, health/) and the released device lock files.
The restart of containerd goes through hostPID + nsenter into PID 1's namespaces
(systemctl talks to the host's systemd), so no systemd socket is mounted; hostPID is set
only on the installer and cleanup DaemonSets, which hold no API credentials.
Include with (dict "ctx" $ "cleanup" true|false).
*/}}
{{- define "gpuvm.installer.volumeMounts" -}}
{{- $v := .ctx.Values -}}
- name: host-gpuvm-dir
  mountPath: {{ printf "/host%s" $v.installer.hostDir }}
- name: host-shim-config
  mountPath: {{ printf "/host%s" $v.installer.shimConfigDir }}
- name: host-containerd-config
  mountPath: {{ printf "/host%s" $v.installer.containerd.configDir }}
- name: host-run-gpuvm
  mountPath: {{ printf "/host%s" (include "gpuvm.host.runDir" .ctx) }}
  readOnly: {{ not .cleanup }}
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
    path: {{ include "gpuvm.host.runDir" . }}
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
