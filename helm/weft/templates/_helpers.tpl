{{/* Names. */}}
{{- define "weft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "weft.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "weft.router" -}}{{ include "weft.fullname" . }}-router{{- end -}}
{{- define "weft.routerHeadless" -}}{{ include "weft.fullname" . }}-router-peers{{- end -}}
{{- define "weft.node" -}}{{ include "weft.fullname" . }}-node{{- end -}}
{{- define "weft.nodeCluster" -}}{{ include "weft.fullname" . }}-cluster{{- end -}}
{{- define "weft.ops" -}}{{ include "weft.fullname" . }}-ops{{- end -}}
{{- define "weft.routerOps" -}}{{ include "weft.fullname" . }}-router-ops{{- end -}}
{{- define "weft.client" -}}{{ include "weft.fullname" . }}{{- end -}}

{{- define "weft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "weft.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "weft.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels: pass (dict "ctx" $ "component" "node"). */}}
{{- define "weft.labels" -}}
app.kubernetes.io/name: {{ include "weft.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: weft
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "weft.selector" -}}
app.kubernetes.io/name: {{ include "weft.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* DNS name of router pod i. */}}
{{- define "weft.routerHost" -}}
{{- printf "%s-%d.%s.%s.svc" (include "weft.router" .ctx) (int .i) (include "weft.routerHeadless" .ctx) .ctx.Release.Namespace -}}
{{- end -}}

{{/* --peers of weft-router: id=host:raftPort for every voter (id = pod ordinal). */}}
{{- define "weft.routerPeers" -}}
{{- $ctx := . -}}
{{- $out := list -}}
{{- range $i := until (int .Values.router.replicas) -}}
{{- $out = append $out (printf "%d=%s:%d" $i (include "weft.routerHost" (dict "ctx" $ctx "i" $i)) (int $ctx.Values.router.raftPort)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* --router of weft-node: every router pod. */}}
{{- define "weft.routerAddrs" -}}
{{- $ctx := . -}}
{{- $out := list -}}
{{- range $i := until (int .Values.router.replicas) -}}
{{- $out = append $out (printf "%s:%d" (include "weft.routerHost" (dict "ctx" $ctx "i" $i)) (int $ctx.Values.router.port)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* The port peers dial for relay traffic: the cluster listener (this build always
     binds it; the gRPC port is reserved and not bound). */}}
{{- define "weft.relayPort" -}}
{{- .Values.node.ports.cluster -}}
{{- end -}}

{{/* The port that serves /healthz, /readyz, /metrics. */}}
{{- define "weft.opsPort" -}}
{{- if .Values.node.separateOpsListener -}}{{ .Values.node.ports.ops }}{{- else -}}{{ .Values.node.ports.http }}{{- end -}}
{{- end -}}
{{- define "weft.opsPortName" -}}
{{- if .Values.node.separateOpsListener -}}ops{{- else -}}http{{- end -}}
{{- end -}}

{{/* Shutdown grace of the node, seconds (rounded up). */}}
{{- define "weft.shutdownGraceSeconds" -}}
{{- $ms := 10000 -}}
{{- with .Values.node.config.timing -}}{{- if hasKey . "shutdown_grace_ms" -}}{{- $ms = int .shutdown_grace_ms -}}{{- end -}}{{- end -}}
{{- div (add $ms 999) 1000 -}}
{{- end -}}

{{/* terminationGracePeriodSeconds of a node pod: preStop (drain) + grace + margin. */}}
{{- define "weft.nodeTerminationGrace" -}}
{{- add (int .Values.node.drain.handoffSeconds) (int (include "weft.shutdownGraceSeconds" .)) (int .Values.node.drain.extraSeconds) -}}
{{- end -}}

{{/* A TOML value: integers stay integers (Helm reads every YAML number as float64). */}}
{{- define "weft.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "float64" $v -}}
{{- if eq $v (floor $v) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "bool" $v) -}}
{{- $v -}}
{{- else if kindIs "string" $v -}}
{{- $v | toJson -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i -}}, {{ end -}}{{- include "weft.tomlValue" $e -}}{{- end -}}]
{{- else -}}
{{- fail (printf "cannot write %v as a TOML value" $v) -}}
{{- end -}}
{{- end -}}

{{/* A table's scalar keys, then its arrays of tables: (dict "name" "auth" "table" $map). */}}
{{- define "weft.tomlTable" -}}
{{- $name := .name -}}
{{- $t := .table -}}
{{- if $name }}
[{{ $name }}]
{{- end }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := index $t $k }}
{{- if not (or (kindIs "map" $v) (and (kindIs "slice" $v) (gt (len $v) 0) (kindIs "map" (first $v)))) }}
{{ $k }} = {{ include "weft.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $t | sortAlpha }}
{{- $v := index $t $k }}
{{- $full := ternary $k (printf "%s.%s" $name $k) (eq $name "") }}
{{- if kindIs "map" $v }}
{{ include "weft.tomlTable" (dict "name" $full "table" $v) }}
{{- else if and (kindIs "slice" $v) (gt (len $v) 0) (kindIs "map" (first $v)) }}
{{- range $e := $v }}

[[{{ $full }}]]
{{- range $ek := keys $e | sortAlpha }}
{{ $ek }} = {{ include "weft.tomlValue" (index $e $ek) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The node's weft.toml. */}}
{{- define "weft.nodeToml" -}}
{{- $cfg := deepCopy .Values.node.config -}}
{{- if and (hasKey $cfg "namespaces") (eq (len $cfg.namespaces) 0) -}}{{- $_ := unset $cfg "namespaces" -}}{{- end -}}
{{- if .Values.auth.enabled -}}
{{- $auth := dict -}}
{{- if .Values.auth.publicKeys.existingSecret -}}
{{- $files := list -}}
{{- range $f := .Values.auth.publicKeys.files -}}{{- $files = append $files (printf "/etc/weft/jwt/%s" $f) -}}{{- end -}}
{{- $_ := set $auth "public_keys" $files -}}
{{- end -}}
{{- $keys := include "weft.apiKeys" . | fromJsonArray -}}
{{- if $keys -}}
{{- $_ := set $auth "api_keys" $keys -}}
{{- end -}}
{{- if $auth -}}{{- $_ := set $cfg "auth" $auth -}}{{- end -}}
{{- end -}}
{{- if .Values.http.allowedOrigins -}}
{{- $_ := set $cfg "http" (dict "allowed_origins" .Values.http.allowedOrigins) -}}
{{- end -}}
# weft-node configuration rendered by the Helm chart (flags and WEFT_* env override it).
{{ include "weft.tomlTable" (dict "name" "" "table" $cfg) }}
{{- end -}}

{{/* Files the cluster mTLS settings point at, per mode. */}}
{{- define "weft.clusterTlsEnv" -}}
{{- $mode := .ctx.Values.cluster.tls.mode -}}
{{- if eq $mode "none" }}
- name: WEFT_CLUSTER_INSECURE
  value: "true"
{{- else if or (eq $mode "generated") (and (eq $mode "certManager") (eq .component "node") .ctx.Values.cluster.tls.certManager.csiDriver) }}
- name: WEFT_CLUSTER_CA_FILE
  value: /etc/weft/cluster/ca.crt
- name: WEFT_CLUSTER_CERT_FILE
  value: /etc/weft/cluster/tls.crt
- name: WEFT_CLUSTER_KEY_FILE
  value: /etc/weft/cluster/tls.key
{{- else }}
- name: WEFT_CLUSTER_CA_FILE
  value: /etc/weft/cluster/ca.crt
- name: WEFT_CLUSTER_CERT_FILE
  value: /etc/weft/cluster/$(POD_NAME).crt
- name: WEFT_CLUSTER_KEY_FILE
  value: /etc/weft/cluster/$(POD_NAME).key
{{- end }}
{{- end -}}

{{/* Scheduling: anti-affinity and topology spread by component. */}}
{{- define "weft.scheduling" -}}
{{- $v := .values -}}
{{- if $v.affinity }}
affinity:
  {{- toYaml $v.affinity | nindent 2 }}
{{- else if eq $v.antiAffinity "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "weft.selector" (dict "ctx" .ctx "component" .component) | nindent 14 }}
{{- else if eq $v.antiAffinity "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "weft.selector" (dict "ctx" .ctx "component" .component) | nindent 12 }}
{{- end }}
{{- if $v.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: {{ $v.topologySpread.topologyKey }}
    whenUnsatisfiable: {{ $v.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "weft.selector" (dict "ctx" .ctx "component" .component) | nindent 8 }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The plain-HTTP port the preStop drain call (an admin route) goes to: the ops
     listener when there is one (always with tls.enabled), else the HTTP port. */}}
{{- define "weft.drainPort" -}}
{{- include "weft.opsPort" . -}}
{{- end -}}

{{/* The most node pods that can exist (HPA max or replicas). */}}
{{- define "weft.nodeMaxReplicas" -}}
{{- if .Values.node.hpa.enabled -}}{{ .Values.node.hpa.maxReplicas }}{{- else -}}{{ .Values.node.replicas }}{{- end -}}
{{- end -}}

{{/* The cert-manager issuer that signs cluster certificates. */}}
{{- define "weft.issuerName" -}}
{{- default (printf "%s-cluster-ca" (include "weft.fullname" .)) .Values.cluster.tls.certManager.issuerRef.name -}}
{{- end -}}
{{- define "weft.issuerKind" -}}
{{- default "Issuer" .Values.cluster.tls.certManager.issuerRef.kind -}}
{{- end -}}

{{/* The Secret the chart creates for client auth (HMAC secret, generated API keys). */}}
{{- define "weft.authSecret" -}}{{ include "weft.fullname" . }}-auth{{- end -}}

{{/* The Secret holding the CA that signs members' certificates (cluster.tls.mode=generated). */}}
{{- define "weft.signerSecret" -}}
{{- default (printf "%s-cluster-signer" (include "weft.fullname" .)) .Values.cluster.tls.generated.caSecret -}}
{{- end -}}

{{/* A generated secret value of the auth Secret, by its key there: (dict "ctx" $ "key"
     "admin-key"). Made once per render (templates share the cache, so the Secret and
     the hash in weft.toml agree) and kept across upgrades: an existing value of the
     installed Secret is reused (lookup; empty under `helm template`). */}}
{{- define "weft.generatedKey" -}}
{{- $ctx := .ctx -}}
{{- if not (hasKey $ctx.Values "__weftGenerated") -}}
{{- $_ := set $ctx.Values "__weftGenerated" (dict) -}}
{{- end -}}
{{- $cache := $ctx.Values.__weftGenerated -}}
{{- if not (hasKey $cache .key) -}}
{{- $old := "" -}}
{{- $s := lookup "v1" "Secret" $ctx.Release.Namespace (include "weft.authSecret" $ctx) -}}
{{- if and $s $s.data (hasKey $s.data .key) -}}
{{- $old = index $s.data .key | b64dec -}}
{{- end -}}
{{- $_ := set $cache .key (default (randAlphaNum 48) $old) -}}
{{- end -}}
{{- index $cache .key -}}
{{- end -}}

{{/* Whether the chart supplies the HS256 secret (a value or a generated one). */}}
{{- define "weft.hmacFromChart" -}}
{{- $h := .Values.auth.hmacSecret -}}
{{- if and .Values.auth.enabled (not $h.existingSecret) (or $h.value $h.generate) -}}true{{- end -}}
{{- end -}}

{{/* Whether the node reads an HS256 secret file. */}}
{{- define "weft.hmacMounted" -}}
{{- if and .Values.auth.enabled (or .Values.auth.hmacSecret.existingSecret (include "weft.hmacFromChart" .)) -}}true{{- end -}}
{{- end -}}

{{/* Whether the chart generates the admin key. */}}
{{- define "weft.adminKeyGenerated" -}}
{{- if and .Values.auth.enabled .Values.auth.adminKey.generate (not .Values.auth.adminKey.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* Whether the chart generates the load tests' API key (publish and subscribe lt.>). */}}
{{- define "weft.loadtestKeyGenerated" -}}
{{- if and .Values.auth.enabled (or (and .Values.test.enabled (not .Values.test.token.existingSecret)) (and .Values.loadJob.enabled (not .Values.loadJob.token.existingSecret))) -}}true{{- end -}}
{{- end -}}

{{/* The load-test token env var: (dict "ctx" $ "token" .Values.test.token). */}}
{{- define "weft.loadtestTokenEnv" -}}
{{- $ctx := .ctx -}}
{{- if .token.existingSecret }}
- name: WEFT_LOADTEST_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .token.existingSecret }}
      key: {{ .token.key }}
{{- else if $ctx.Values.auth.enabled }}
- name: WEFT_LOADTEST_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "weft.authSecret" $ctx }}
      key: loadtest-key
{{- end }}
{{- end -}}

{{/* The API keys weft.toml lists: auth.apiKeys plus the generated ones (hashes only). */}}
{{- define "weft.apiKeys" -}}
{{- $keys := list -}}
{{- range .Values.auth.apiKeys -}}{{- $keys = append $keys . -}}{{- end -}}
{{- if include "weft.adminKeyGenerated" . -}}
{{- $keys = append $keys (dict "name" "admin" "sha256" (include "weft.generatedKey" (dict "ctx" . "key" "admin-key") | sha256sum) "admin" true) -}}
{{- end -}}
{{- if include "weft.loadtestKeyGenerated" . -}}
{{- $keys = append $keys (dict "name" "loadtest" "sha256" (include "weft.generatedKey" (dict "ctx" . "key" "loadtest-key") | sha256sum) "publish" (list "lt.>") "subscribe" (list "lt.>")) -}}
{{- end -}}
{{- toJson $keys -}}
{{- end -}}

{{/* cluster.tls.mode=generated: the init container that signs this pod's certificate
     with the chart's CA (weft-node cluster-cert). The CA key is mounted here only; the
     member container gets ca.crt, tls.crt and tls.key in a memory-backed emptyDir.
     (dict "ctx" $ "component" "node"|"router"). */}}
{{- define "weft.clusterCertInit" -}}
{{- $ctx := .ctx -}}
{{- if eq $ctx.Values.cluster.tls.mode "generated" }}
initContainers:
  - name: cluster-cert
    image: {{ include "weft.image" $ctx }}
    imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
    command: ["/usr/local/bin/weft-node", "cluster-cert"]
    args:
      - --ca-cert
      - /etc/weft/signer/ca.crt
      - --ca-key
      - /etc/weft/signer/ca.key
      - --identity
      {{- if eq .component "router" }}
      - weft://router/$(WEFT_ID)
      {{- else }}
      - weft://node/$(POD_NAME)
      {{- end }}
      - --days
      - {{ $ctx.Values.cluster.tls.generated.certValidityDays | int | quote }}
      - --out
      - /etc/weft/cluster
    env:
      {{- if eq .component "router" }}
      - name: WEFT_ID
        valueFrom:
          fieldRef:
            fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
      {{- else }}
      - name: POD_NAME
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      {{- end }}
    resources:
      requests: {cpu: 10m, memory: 16Mi}
      limits: {memory: 64Mi}
    securityContext:
      {{- toYaml $ctx.Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - name: cluster-signer
        mountPath: /etc/weft/signer
        readOnly: true
      - name: cluster-tls
        mountPath: /etc/weft/cluster
{{- end }}
{{- end -}}

{{/* cluster.tls.mode=generated: the CA Secret (init container only) and the pod's own
     certificate volume. */}}
{{- define "weft.clusterCertVolumes" -}}
- name: cluster-signer
  secret:
    secretName: {{ include "weft.signerSecret" . }}
    defaultMode: 0440
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: ca.key, path: ca.key}
# This pod's key and certificate: in memory, gone with the pod.
- name: cluster-tls
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end -}}


{{/* The client Service as weft-loadtest's --target: https:// with tls.enabled. */}}
{{- define "weft.clientTarget" -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.tls.enabled) (include "weft.client" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}

{{/* Whether the load tests mount a CA for the client port's certificate. */}}
{{- define "weft.clientCaMounted" -}}
{{- if and .Values.tls.enabled .Values.tls.ca.key -}}true{{- end -}}
{{- end -}}

{{/* weft-loadtest's --ca-file arguments (with tls.enabled and a CA key). */}}
{{- define "weft.clientCaArgs" -}}
{{- if include "weft.clientCaMounted" . }}
- --ca-file
- /etc/weft/client-ca/ca.crt
{{- end }}
{{- end -}}

{{/* The load-test container's mount of that CA. */}}
{{- define "weft.clientCaMount" -}}
{{- if include "weft.clientCaMounted" . }}
volumeMounts:
  - name: client-ca
    mountPath: /etc/weft/client-ca
    readOnly: true
{{- end }}
{{- end -}}

{{/* The load-test pod's volume holding that CA: tls.ca.key of tls.ca.existingSecret,
     or of the TLS Secret itself. */}}
{{- define "weft.clientCaVolume" -}}
{{- if include "weft.clientCaMounted" . }}
volumes:
  - name: client-ca
    secret:
      secretName: {{ default .Values.tls.existingSecret .Values.tls.ca.existingSecret }}
      items:
        - key: {{ .Values.tls.ca.key }}
          path: ca.crt
{{- end }}
{{- end -}}
