{{/* PromQL of the alerts whose thresholds need more than a value substituted (prometheusrule.yaml). */}}

{{/* Seconds of a Prometheus duration such as 15s, 1m30s (milliseconds are dropped). */}}
{{- define "finetune-operator.durationSeconds" -}}
{{- $seconds := dict "ms" 0 "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800 "y" 31536000 -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d|w|y)" . -1 -}}
{{- $total = add $total (mul (regexFind "^[0-9]+" . | atoi) (get $seconds (regexFind "[a-z]+$" .))) -}}
{{- end -}}
{{- $total -}}
{{- end }}

{{/* Without `or vector(0)` a Prometheus with less than 10 minutes of data (new, or restarted
without persistent storage) has nothing to compare with and the alert never fires. */}}
{{- define "finetune-operator.alerts.jobFailed" -}}
sum(finetune_operator_jobs{phase="Failed"}) > (sum(finetune_operator_jobs{phase="Failed"} offset 10m) or vector(0))
{{- end }}
{{/* The stall window: the operator's stall timeout plus one trainer scrape interval. changes() over
[W] is 0 once the last sample of the previous step left the window, W after the scrape *before*
the last step; one scrape interval more makes it W after the scrape that saw the step, so the alert
never fires before the operator's timeout and fires within one evaluation interval after it (no
`for`: the window is the wait). The `offset` term needs the series to be as old as the window, so a
new or restarted trainer pod (a new series) does not fire while it loads the model. */}}
{{- define "finetune-operator.stallWindow" -}}
{{- add .Values.operator.stallTimeoutSeconds (include "finetune-operator.durationSeconds" .Values.metrics.trainerPodMonitor.interval) }}s
{{- end }}
{{- define "finetune-operator.alerts.jobStalled" -}}
{{- $w := include "finetune-operator.stallWindow" . -}}
max by (namespace, finetune_job) (finetune_trainer_step and changes(finetune_trainer_step[{{ $w }}]) == 0 and finetune_trainer_step < finetune_trainer_total_steps and finetune_trainer_step offset {{ $w }})
{{- end }}
