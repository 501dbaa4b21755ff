{{/* Chart name, overridable. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, unless the release name already contains the chart name. */}}
{{- define "finetune-operator.fullname" -}}
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

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the release carries. */}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{/* Labels that select the operator pod. */}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag|@digest] from an image block; the tag defaults to the appVersion. */}}
{{- define "finetune-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- include "finetune-operator.imageRef" (list .Values.image .) }}
{{- end }}

{{- define "finetune-operator.trainerImage" -}}
{{- include "finetune-operator.imageRef" (list .Values.trainer.image .) }}
{{- end }}

{{/* Namespaces the trainer PodMonitor looks in: its own list, else the watched ones. */}}
{{- define "finetune-operator.trainerMonitorNamespaces" -}}
{{- $ns := .Values.metrics.trainerPodMonitor.namespaces | default .Values.watch.namespaces }}
{{- toJson $ns }}
{{- end }}

{{/* Ports and probe paths of the operator (finetune_api.constants, finetune_operator.settings). */}}
{{- define "finetune-operator.metricsPort" -}}8080{{- end }}
{{- define "finetune-operator.healthPort" -}}8081{{- end }}
{{- define "finetune-operator.livenessPath" -}}/healthz{{- end }}
{{- define "finetune-operator.readinessPath" -}}/readyz{{- end }}

{{/* Arguments of `finetune operator` (flags of finetune_operator.settings). */}}
{{- define "finetune-operator.args" -}}
{{- if .Values.watch.namespaces }}
{{- range .Values.watch.namespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
- --trainer-image={{ include "finetune-operator.trainerImage" . }}
- --metrics-port={{ include "finetune-operator.metricsPort" . }}
- --health-port={{ include "finetune-operator.healthPort" . }}
- --stall-timeout={{ .Values.operator.stallTimeoutSeconds }}
- --resync-interval={{ .Values.operator.resyncIntervalSeconds }}
{{- if .Values.leaderElection.enabled }}
- --leader-elect
- --leader-election-namespace={{ .Release.Namespace }}
- --leader-election-name={{ include "finetune-operator.leaseName" . }}
- --lease-duration={{ .Values.leaderElection.leaseDurationSeconds }}
{{- else }}
- --standalone
{{- end }}
{{- with .Values.policy }}
- --allowed-images={{ join "," .allowedImages }}
- --allowed-priority-classes={{ join "," .allowedPriorityClasses }}
- --allowed-toleration-keys={{ join "," .allowedTolerationKeys }}
- --allowed-node-selector-keys={{ join "," .allowedNodeSelectorKeys }}
{{- end }}
{{- with .Values.trainerPods }}
- --trainer-cpu-per-gpu={{ .cpuPerGpu }}
- --trainer-memory-per-gpu={{ .memoryPerGpu }}
- --trainer-cpu-without-gpu={{ .cpuWithoutGpu }}
- --trainer-memory-without-gpu={{ .memoryWithoutGpu }}
- --trainer-shm-size={{ .shmSizeLimit }}
- --trainer-scratch-size={{ .scratchSize }}
{{- if .credentialsAsFiles }}
- --credentials-as-files
{{- end }}
{{- if .networkPolicy.enabled }}
- --trainer-network-policy
{{- end }}
{{- end }}
{{- with .Values.preflight }}
- --preflight-cpu={{ .cpu }}
- --preflight-memory={{ .memory }}
- --preflight-memory-limit={{ .memoryLimit }}
- --preflight-scratch-size={{ .scratchSize }}
- --preflight-timeout={{ .timeoutSeconds }}
{{- $pools := list }}
{{- range $product, $size := .gpuMemory }}
{{- $pools = append $pools (printf "%s=%s" $product (toString $size)) }}
{{- end }}
- --preflight-gpu-memory={{ join "," $pools }}
{{- end }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Pod anti-affinity of the operator replicas (podAntiAffinity: soft | hard), one per node. */}}
{{- define "finetune-operator.podAntiAffinity" -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "finetune-operator.selectorLabels" . | fromYaml)) }}
{{- if eq .Values.podAntiAffinity "hard" }}
requiredDuringSchedulingIgnoredDuringExecution:
  - {{ toJson $term }}
{{- else }}
preferredDuringSchedulingIgnoredDuringExecution:
  - weight: 100
    podAffinityTerm: {{ toJson $term }}
{{- end }}
{{- end }}

{{/* Labels of the pods the operator creates for trainers (finetune_api.constants, builders). */}}
{{- define "finetune-operator.trainerPodLabels" -}}
app.kubernetes.io/component: trainer
app.kubernetes.io/managed-by: finetune-operator
{{- end }}

{{/* The operator's RBAC rules, one resource per rule, only the verbs finetune_operator calls
(k8s.py, Kopf's watches and its annotation patches). Nothing cluster-scoped: with exact namespaces
the operator turns Kopf's namespace and CRD scanning off. */}}
{{- define "finetune-operator.rules" -}}
# Kopf watches FineTuneJobs and keeps its progress in their annotations.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# The operator is the only writer of status.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# The trainer workload: created, watched, suspended/resumed (spec.suspend); deleted by owner GC.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The spec mounted into the pods: watched (one deleted by hand is made again), patched after spec edits.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The headless rendezvous Service: watched like the ConfigMap; its selector follows the Job's uid.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Trainer pods: watched for progress and exit.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The stall watchdog notes its reason on a pod before it restarts it.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["patch"]
# Stall restarts evict the pod (a disruption, not a failure).
- apiGroups: [""]
  resources: ["pods/eviction"]
  verbs: ["create"]
# Events on the FineTuneJob (kubectl describe).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.trainerPods.networkPolicy.enabled }}
# One NetworkPolicy per job: its ranks may connect to each other (deleted by owner GC).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
{{- end }}
{{- if .Capabilities.APIVersions.Has "kueue.x-k8s.io/v1beta2" }}
# Kueue's Workloads (jobs with spec.queueName): why a job waits, read from their status. Only where
# the cluster serves Kueue's API (helm template: --api-versions kueue.x-k8s.io/v1beta2).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

{{/* PromQL of the alerts (prometheusrule.yaml; the failure and stall alerts are in _alerts.tpl). */}}
{{- define "finetune-operator.promql.restartsClimbing" -}}
sum by (reason) (increase(finetune_operator_workload_restarts_total[{{ .Values.prometheusRule.alerts.restartsClimbing.window }}])) >= {{ .Values.prometheusRule.alerts.restartsClimbing.threshold }}
{{- end }}
{{- define "finetune-operator.promql.operatorDown" -}}
absent(up{job="{{ include "finetune-operator.fullname" . }}-metrics", namespace="{{ .Release.Namespace }}"} == 1)
{{- end }}
{{- define "finetune-operator.promql.reconcileErrors" -}}
sum(rate(finetune_operator_reconcile_errors_total[10m])) > {{ .Values.prometheusRule.alerts.reconcileErrors.threshold }}
{{- end }}

{{/* The leader-election Lease (in the release namespace). */}}
{{- define "finetune-operator.leaseName" -}}
{{- include "finetune-operator.fullname" . }}
{{- end }}
