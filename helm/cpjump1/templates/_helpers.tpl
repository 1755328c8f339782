{{/*
Names are fixed, not derived from the release name: the DAGs' stage pods refer to them and
their single source is plugins/cpjump1/deploy.py (tests/test_helm.py checks both agree).
One release of this chart per namespace.
*/}}

{{- define "cpjump1.labels" -}}
app.kubernetes.io/name: cpjump1
app.kubernetes.io/part-of: cpjump1
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{/* Labels of stage pods; the NetworkPolicy selects on the first two. */}}
{{- define "cpjump1.stageSelectorLabels" -}}
app.kubernetes.io/part-of: cpjump1
app.kubernetes.io/component: stage
{{- end -}}

{{/* Image reference of a stage image: (dict "root" $ "name" "profiling") */}}
{{- define "cpjump1.image" -}}
{{- $img := .root.Values.image -}}
{{- $repo := printf "%s/%s" $img.registry (index $img.names .name) -}}
{{- $digest := index ($img.digests | default dict) .name | default "" -}}
{{- if $digest -}}
{{- printf "%s@%s" $repo $digest -}}
{{- else -}}
{{- printf "%s:%s" $repo ($img.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "cpjump1.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cpjump1.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Storage root the stages write to: the PVC mount when storage.pvc.enabled and no root given. */}}
{{- define "cpjump1.storageRoot" -}}
{{- if .Values.storage.root -}}
{{- .Values.storage.root -}}
{{- else if .Values.storage.pvc.enabled -}}
/data
{{- end -}}
{{- end -}}

{{/*
ConfigMap data from a folder under files/ (a symlink to the repository's pipelines/ or
expectations/). Keys: the path below the folder with "/" replaced by "__"
(cpjump1.deploy.configmap_key). Text files go to data, anything else to binaryData.
Call with (dict "root" $ "folder" "pipelines").
*/}}
{{- define "cpjump1.folderData" -}}
{{- $root := .root -}}
{{- $prefix := printf "files/%s/" .folder -}}
{{- $text := list ".cppipe" ".json" ".yml" ".yaml" ".txt" ".csv" ".tsv" ".md" ".py" ".toml" ".cfg" ".ini" -}}
{{- $data := dict -}}
{{- $binary := dict -}}
{{- range $path, $_ := $root.Files.Glob (printf "%s**" $prefix) -}}
{{- $rel := trimPrefix $prefix $path -}}
{{- if not (or (hasPrefix "." (base $rel)) (contains "/." $rel) (contains "__pycache__" $rel)) -}}
{{- $key := replace "/" "__" $rel -}}
{{- if has (ext $rel) $text -}}
{{- $_ := set $data $key ($root.Files.Get $path) -}}
{{- else -}}
{{- $_ := set $binary $key ($root.Files.Get $path | b64enc) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $data }}
data:
{{- range $key := keys $data | sortAlpha }}
  {{ $key }}: {{ index $data $key | quote }}
{{- end }}
{{- end }}
{{- if $binary }}
binaryData:
{{- range $key := keys $binary | sortAlpha }}
  {{ $key }}: {{ index $binary $key | quote }}
{{- end }}
{{- end }}
{{- if not (or $data $binary) }}
data: {}
{{- end }}
{{- end -}}
