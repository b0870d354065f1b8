"""Every limit in cellcloud, named with its unit (TigerBeetle style). Over a limit is an error."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    # Lambda's documented quotas.
    invoke_payload_bytes_max: int = 6 * MiB
    event_payload_bytes_max: int = 1 * MiB  # InvocationType=Event: 1 MB (1,048,576 bytes)
    response_payload_bytes_max: int = 6 * MiB
    zip_bytes_max: int = 50 * MiB  # direct upload (Lambda: 50 MB zipped)
    unzipped_bytes_max: int = 250 * MiB
    zip_members_max: int = 20_000
    env_vars_bytes_max: int = 4 * 1024
    memory_mb_min: int = 128
    memory_mb_max: int = 10_240
    timeout_s_min: int = 1
    timeout_s_max: int = 900
    timeout_s_default: int = 3
    memory_mb_default: int = 128
    ephemeral_mb_default: int = 512
    log_tail_bytes: int = 4 * 1024  # LogType=Tail returns the last 4 KB
    # CPU in proportion to memory: one full vCPU at 1,769 MB (0.072 vCPU at 128 MB, ~5.8 at
    # 10,240 MB). Enforced as a CFS quota per period of env_cpu_period_us.
    memory_mb_per_vcpu: int = 1769
    # SQS FIFO queues: a MessageDeduplicationId (or body hash) sent again within this window
    # is accepted and not delivered again.
    sqs_fifo_dedup_window_ms: int = 300_000
    # SQS event source mappings (Lambda's rules and quotas; core/esm.py).
    esm_batch_size_max: int = 10_000  # a standard queue's BatchSize (with a batching window)
    esm_batch_size_no_window_max: int = 10  # BatchSize without MaximumBatchingWindowInSeconds
    esm_batch_size_fifo_max: int = 10  # a FIFO queue's BatchSize
    esm_batching_window_s_max: int = 300
    esm_concurrency_min: int = 2  # ScalingConfig.MaximumConcurrency
    esm_concurrency_max: int = 1000  # ScalingConfig.MaximumConcurrency, and batches at once
    esm_filters_max: int = 5  # FilterCriteria.Filters of one mapping
    esm_mappings_per_tenant_max: int = 1000  # ours: event source mappings of one account
    esm_concurrency_initial: int = 5  # batches a mapping's poller runs at once at first
    esm_scale_up_interval_ms: int = 200  # then one more per interval (Lambda: 300 a minute)
    esm_idle_poll_ms: int = 1000  # an empty queue is received from again (or on a send)
    esm_backoff_ms_min: int = 100  # after a throttle or error, capped exponential backoff
    esm_backoff_ms_max: int = 10_000
    # Ours.
    invocation_log_bytes_max: int = 256 * 1024  # kept per invocation, the tail wins
    function_log_bytes_max: int = 1 * MiB  # kept per function at the frontend
    function_concurrency_default: int = 100  # per-function environments, then 429
    envs_per_agent_max: int = 1000
    env_idle_timeout_ms: int = 300_000
    env_create_timeout_ms: int = 10_000
    env_cpu_period_us: int = 100_000  # the CFS bandwidth period the CPU cap is a quota of
    env_cpu_quota_us_min: int = 1_000  # the kernel refuses a smaller quota
    # Lambda's init burst: during the init phase (jail set-up + runtime start + handler
    # import, bounded by env_create_timeout_ms) an environment may use at least this many
    # vCPUs; its memory's share is enforced from the moment it reports ready.
    env_init_vcpu_min: int = 1
    # Extensions and the Telemetry API (Lambda's documented values).
    extensions_per_function_max: int = 10
    # The SHUTDOWN phase (Lambda's): 2 s with external extensions registered, 500 ms with
    # internal ones only (the runtime's SIGTERM grace), none without extensions.
    env_shutdown_ms_with_extensions: int = 2_000
    env_shutdown_ms_internal_extensions: int = 500
    telemetry_max_items_min: int = 1_000
    telemetry_max_items_max: int = 10_000
    telemetry_max_items_default: int = 1_000
    telemetry_max_bytes_min: int = 256 * 1024
    telemetry_max_bytes_max: int = 1 * MiB
    telemetry_max_bytes_default: int = 256 * 1024
    telemetry_timeout_ms_min: int = 25
    telemetry_timeout_ms_max: int = 30_000
    telemetry_timeout_ms_default: int = 1_000
    telemetry_post_timeout_ms: int = 1_000  # one POST to a subscriber's listener, then dropped
    telemetry_subscribers_max: int = 10
    telemetry_backlog_items_max: int = 1_000  # init-phase events kept for late subscribers
    agent_call_timeout_ms: int = 5_000
    # A process being replaced (rollout, `down`) drains: it refuses new calls unrun and waits
    # this long for the calls under way (transport Server.drain); its callers send a refused or
    # undeliverable call again for at most redeliver_ms (the replacement's start).
    drain_ms: int = 30_000
    redeliver_ms: int = 30_000
    # An invoke answered EnvGone (the environment died while idle: no handler code ran) is
    # placed again, on a fresh environment, at most this many times (the frontend's one retry
    # layer); the agent remembers at most this many gone environment ids to answer EnvGone.
    env_gone_retries_max: int = 3
    # An agent's full status waits this long for its network helper's counters (the helper
    # answers one call at a time; one wiring a namespace must not stall the region's status).
    agent_status_network_wait_ms: int = 1_000
    # Distinct (account, function) label pairs a component's /metrics keeps, in all and per
    # account; beyond either, new functions' series fold into their account's
    # function="__other__" (bounded cardinality; one tenant cannot crowd out the others).
    metrics_functions_max: int = 1_000
    metrics_functions_per_account_max: int = 250
    # Expositions a process pushes to the one that gathers them (a dispatcher to its frontend,
    # the control plane to the router; docs/observability.md): how often, how long one counts
    # as current, how large one may be, how many pushers a gatherer keeps.
    metrics_push_interval_ms: int = 2_000
    metrics_pushed_stale_ms: int = 10_000
    metrics_pushed_bytes_max: int = 4 * MiB
    metrics_pushers_max: int = 64
    # A frontend waits this long for an agent's exposition (under the router's wait for the
    # cell's, so a hung agent leaves only itself out of a scrape).
    metrics_agent_timeout_ms: int = 2_000
    # An incoming X-Amzn-Trace-Id longer than this is not honoured (a new trace id is made);
    # a reply carrying more spans than this (agent + environment: two) is refused.
    trace_header_chars_max: int = 1024
    trace_spans_per_reply_max: int = 8
    # Functions' logs as CloudWatch Logs (frontend/logstore.py, frontend/logs_api.py).
    log_events_per_group_max: int = 100_000  # the oldest events of a group go first
    log_groups_per_account_max: int = 1_000
    logs_events_limit_max: int = 10_000  # GetLogEvents/FilterLogEvents' `limit` (CloudWatch's)
    logs_describe_limit_max: int = 50  # DescribeLogGroups/DescribeLogStreams' `limit`
    logs_filter_scan_events_max: int = 10_000  # events one FilterLogEvents call looks at
    logs_filter_pattern_chars_max: int = 1_024  # a filterPattern (CloudWatch's)
    logs_filter_streams_max: int = 100  # logStreamNames of one FilterLogEvents (CloudWatch's)
    logs_live_poll_interval_ms: int = 1_000  # running invocations' new lines pulled this often
    logs_live_answer_bytes_max: int = 4 * MiB  # lines one agent's `live_logs` answer carries
    # A sync invoke is answered at the latest this long after its function's timeout, whatever
    # the agents do (core/invoke.py answers it with a ServiceException on the first tick past).
    invoke_answer_slack_ms: int = 60_000
    # A router's lease on a warm environment (core/invoke.py) lasts at most this long; then it
    # is revoked (the agent refuses further invocations under it).
    invoke_lease_ms: int = 60_000
    # A router returns a lease unused this long (the frontend's slot goes back), and stops
    # starting invocations under one this close to its expiry.
    router_lease_idle_ms: int = 5_000
    # An invoke finding a lease ask of its function under way waits this long for it.
    router_lease_ask_wait_ms: int = 1_000
    router_lease_expiry_margin_ms: int = 2_000
    router_leases_per_function_max: int = 16  # leases one router holds for one function
    gone_env_ids_remembered_max: int = 1024
    # The function catalog (frontend/functions.py; Lambda's quotas where Lambda has one).
    list_page_items_max: int = 50  # items in one page of any List* answer
    list_max_items_max: int = 10_000  # the largest MaxItems a List* request may ask for
    versions_per_function_max: int = 10_000  # published versions
    aliases_per_function_max: int = 250
    layers_per_function_max: int = 5
    layer_versions_scan_max: int = 10_000  # versions of one layer a list looks through
    tags_per_function_max: int = 50
    tag_key_chars_max: int = 128
    tag_value_chars_max: int = 256
    description_chars_max: int = 256
    role_chars_max: int = 10_000
    runtime_chars_max: int = 64  # one of a layer's CompatibleRuntimes
    layer_runtimes_max: int = 15  # a layer's CompatibleRuntimes
    license_chars_max: int = 512  # a layer's LicenseInfo
    ephemeral_mb_min: int = 512
    ephemeral_mb_max: int = 10_240
    account_concurrency_max: int = 1000  # concurrent executions of one account
    unreserved_concurrency_min: int = 100  # left unreserved by ReservedConcurrentExecutions
    request_body_bytes_max: int = 70 * MiB  # the router reads no more than this (bundle + b64)
    functions_per_tenant_max: int = 10_000
    # Function URLs and response streaming (issue #15; docs/lambda-api.md#function-urls).
    function_url_cors_items_max: int = 100  # members of Cors AllowOrigins/Headers/ExposeHeaders
    function_url_cors_max_age_s_max: int = 86_400  # Cors MaxAge (Lambda's)
    function_url_prelude_bytes_max: int = 64 * 1024  # a streamed HTTP response's JSON prelude
    response_stream_chunk_bytes_max: int = 64 * 1024  # payload of one PayloadChunk event
    response_stream_bytes_max: int = 20 * MiB  # a streamed response (Lambda's default maximum)
    # Held back on the cell's state disk for deletes when it is full (SQLite's WAL needs room
    # to delete); given up on ENOSPC during a delete, taken back when there is room again.
    state_disk_reserve_bytes: int = 8 * MiB
    forget_bundles_digests_max: int = 1000  # digests in one agent ``forget_bundles`` call
    # The public HTTP endpoint (router): every connection owes us bytes on a deadline.
    http_header_timeout_ms: int = 10_000  # request line + headers, from the first byte/accept
    http_body_timeout_ms: int = 30_000  # a body's base allowance, from the end of its headers
    http_body_rate_bytes_per_s_min: int = 64 * 1024  # each byte adds 1/rate s to the allowance
    http_keepalive_idle_timeout_ms: int = 30_000  # no request in flight and no byte sent
    http_connections_max: int = 50_000  # over it, the oldest idle (or stalled) one is closed
    http_fds_reserved: int = 1024  # fds kept free of client connections (cells, files, logs)
    http_sweep_interval_ms: int = 500  # how often expired connections are looked for
    http_header_line_bytes_max: int = 8 * 1024  # the request line or one header line
    http_header_bytes_max: int = 64 * 1024  # request line + all header lines
    http_headers_max: int = 100
    # Answered before its body arrived (403, 413): a declared body up to this is read and
    # dropped so the client can read the answer; a larger or chunked one is cut off (close).
    http_drain_bytes_max: int = 8 * MiB
    # Client JSON (payloads, API bodies): deeper nesting is refused before any parser recurses.
    json_depth_max: int = 512
    # The registry (ECR-compatible, registry/): docs/images.md.
    registry_manifest_bytes_max: int = 4 * MiB  # a manifest or index (ECR: 4 MiB)
    registry_chunk_bytes_max: int = 4 * MiB  # one internal call of a blob upload or read
    registry_blob_bytes_max: int = 10 * 1024 * MiB  # one blob (layer) upload
    registry_image_bytes_max: int = 10 * 1024 * MiB  # declared layer sizes of one image (Lambda)
    registry_upload_grace_ms: int = 3_600_000  # an unreferenced blob is kept this long
    registry_upload_idle_ms: int = 3_600_000  # an upload session untouched this long is dropped
    registry_token_ttl_s: int = 12 * 3600  # GetAuthorizationToken's password (as ECR: 12 h)
    registry_tags_page_max: int = 1000  # tags in one /tags/list page
    registry_api_body_bytes_max: int = 1 * MiB  # an ECR JSON API request
    registry_batch_ids_max: int = 100  # imageIds in one BatchGetImage/BatchDeleteImage
    registry_uploads_per_tenant_max: int = 64  # open upload sessions of one tenant
    registry_repos_per_tenant_max: int = 10_000  # repositories of one tenant
    registry_images_per_repo_max: int = 20_000  # manifests in one repository (ECR's quota)
    # Image-rooted environments on the agent (agent/images.py): docs/images.md.
    image_layer_entries_max: int = 500_000  # tar entries of one layer
    image_layers_max: int = 127  # layers of one image (overlayfs' lower-dir limit is ~500)
    # Unpacked layers an agent keeps (sizes recorded at unpack); past it the least recently
    # used ones no live environment uses are forgotten (core/layer_cache.py). At least one
    # image's worth (registry_image_bytes_max) so any single image fits.
    agent_layer_cache_bytes_max: int = 32 * 1024 * MiB
    # Times one create_env may stream the same layer: once, and once more if the agent
    # forgot it (evicted) between the stream and the create that needed it.
    image_layer_pushes_per_create_max: int = 2
    # ECS tasks and services (core/ecs_*.py, issue #17): docs/fargate.md.
    ecs_containers_per_task_max: int = 10  # containers in one task definition (ECS's quota)
    ecs_service_events_max: int = 100  # a service's events (and scaling decisions) kept
    # The agent's task runner (agent/tasks.py): Fargate-style tasks on one agent.
    agent_tasks_max: int = 64  # tasks one agent runs at once (then AgentFull)
    task_log_bytes_max: int = 1 * MiB  # a container's log lines buffered until polled
    task_log_line_bytes_max: int = 16 * 1024  # one log line (longer: cut, marked)
    task_poll_log_bytes_max: int = 1 * MiB  # log lines one task_poll answer carries
    task_exec_output_bytes_max: int = 64 * 1024  # a health check's output kept (the rest cut)
    task_exec_timeout_s_max: int = 120  # a health check's timeout (ECS's healthCheck: 60)
    task_exec_command_bytes_max: int = 64 * 1024  # a health check's argv, all together
    task_stop_grace_s_max: int = 120  # SIGTERM to SIGKILL (ECS's stopTimeout: 120)
    # The ECS API in the control plane (control/ecs.py): what one account keeps in the region's
    # configuration store (each list stays far below the store's config_list_max).
    ecs_request_bytes_max: int = 64 * 1024  # one ECS request (a task definition: ECS's 64 KiB)
    ecs_clusters_per_tenant_max: int = 100
    ecs_task_definitions_per_tenant_max: int = 1_000  # revisions kept, ACTIVE or INACTIVE
    ecs_cas_attempts_max: int = 8  # a change that keeps losing its compare-and-set
    # Pod manifests (core/pod.py, `cellcloud pod`): one manifest file, and a Kubernetes
    # quantity's text and decimal exponent (so no quantity costs a huge exact integer).
    pod_manifest_bytes_max: int = 1024 * 1024
    k8s_quantity_chars_max: int = 64
    k8s_quantity_exponent_max: int = 30
    # ECS tasks in a cell (frontend/tasks.py): docs/fargate.md.
    ecs_tasks_per_tenant_max: int = 100  # tasks of one account not yet STOPPED, in its cell
    ecs_stopped_task_retention_ms: int = 3_600_000  # a STOPPED task stays described (ECS: ~1 h)
    ecs_task_poll_interval_ms: int = 500  # a running task's containers and logs polled
    ecs_task_poll_failures_max: int = 10  # polls in a row its agent fails: the task is lost
    ecs_task_cpu_units_per_agent_max: int = 16 * 1024  # tasks' cpu on one agent (16 vCPU)
    ecs_awsvpc_subnets_max: int = 16  # networkConfiguration's subnets (ECS's quota)
    ecs_awsvpc_security_groups_max: int = 5  # networkConfiguration's securityGroups (ECS's)
    # ECS services in a cell (frontend/services.py): docs/fargate.md.
    ecs_services_per_tenant_max: int = 100  # services of one account not INACTIVE
    ecs_service_desired_count_max: int = 1_000  # a service's desiredCount (ECS's quota: 5,000)
    ecs_service_tick_interval_ms: int = 1_000  # each service's controller ticked (and its tasks read)
    ecs_inactive_service_retention_ms: int = 3_600_000  # a deleted service stays described
    ecs_service_http_bytes_max: int = 6 * MiB  # a request to a service, and its answer
    ecs_service_http_timeout_ms: int = 60_000  # a task's answer to one proxied request
    ecs_service_deregistration_delay_ms: int = 30_000  # a stopped task's requests finish
    # Autoscaling of ECS services (application-autoscaling API, frontend/services.py).
    ecs_autoscale_sample_interval_ms: int = 1_000  # one sample of each policy's metric
    ecs_autoscale_stable_window_ms: int = 60_000  # averaged to scale in and out (Knative's)
    ecs_autoscale_panic_window_ms: int = 6_000  # averaged to scale out at once (2x the target)
    ecs_scaling_policies_per_target_max: int = 50  # target-tracking policies on one service
    ecs_service_cold_start_wait_ms: int = 30_000  # a request held while a service scales from 0
    ecs_service_cold_connect_retry_ms: int = 50  # a held request's task refused: tried again
    # The EC2 volume API in the control plane (control/ec2.py, issue #19): docs/volumes.md.
    ec2_request_bytes_max: int = 256 * 1024  # one EC2 query-protocol request (a form)
    ec2_request_params_max: int = 2_000  # form fields in one request
    ec2_list_items_max: int = 1_000  # items of one list member (VolumeId.N, Filter.N, Tag.N)
    ec2_filter_value_chars_max: int = 4_096  # characters of one filter's values together
    ec2_volumes_per_tenant_max: int = 1_000  # volumes one account keeps in a region
    ec2_tags_per_resource_max: int = 50  # tags of one volume or snapshot (EC2's)
    ec2_snapshots_per_tenant_max: int = 1_000  # snapshots one account keeps in a region
    ec2_cas_attempts_max: int = 8  # a change that keeps losing its compare-and-set
    # Environments' network (network/): per environment, new connections per second (burst)
    # and connections tracked at once, so one function cannot fill the host's conntrack table.
    env_net_conn_rate_per_s: int = 200
    env_net_conn_burst: int = 400
    env_net_conns_max: int = 1024
    # The network helper's DNS forwarder: UDP queries in flight (then SERVFAIL), TCP
    # connections at once (then closed), how long an upstream resolver may take.
    net_dns_inflight_max: int = 256
    net_dns_tcp_connections_max: int = 64
    net_dns_upstream_timeout_ms: int = 2_000
    net_dns_packet_bytes_max: int = 4096
    net_pool_ready: int = 4  # wired network namespaces kept ready per agent
    net_refill_quiet_ms: int = 20  # the pool is refilled once no request came for this long
    net_admit_batch: int = 64  # slots admitted by the policy per nft transaction
    # Store client: cells one lane keeps a session in ([client_id, seq] each); past it the
    # oldest is forgotten and a new session opens on that cell's next use.
    store_lane_sessions_max: int = 4096
    # Schedules (EventBridge Scheduler subset, docs/schedules.md).
    schedules_per_tenant_max: int = 1_000
    # every schedule is listed each round of the control plane's loop; below the store's
    # config_list_max (10,000)
    schedules_per_region_max: int = 5_000
    schedule_groups_per_tenant_max: int = 100
    schedule_input_bytes_max: int = 256 * 1024  # a target's Input (Scheduler: 256 KB)
    schedule_ticks_per_round_max: int = 100  # ticks one schedule fires per loop round
    schedule_cas_attempts_max: int = 8  # an API change that keeps losing its compare-and-set
    schedule_expired_count_max: int = 2_000  # a cron's dropped ticks counted one by one
    schedule_send_timeout_ms: int = 10_000  # one tick's async invoke to the cell
    schedule_retry_backoff_base_ms: int = 1_000
    schedule_retry_backoff_cap_ms: int = 60_000
    schedule_tick_interval_ms: int = 250  # the control plane's firing loop
    schedule_client_token_ms: int = 3_600_000  # a delete's idempotency token is remembered
    # A supplied async event id (a schedule's tick) is accepted once within this window: twice
    # MaximumEventAgeInSeconds' maximum (a tick is never re-sent later than that after it was
    # due unless the control plane was down longer).
    async_event_ids_remembered_ms: int = 2 * 86_400_000
    # The web console (console/, docs/observability.md): accounts whose functions and queues
    # its pages list, queues per account, log events on a function's page, the login form.
    console_accounts_max: int = 100
    console_queues_per_account_max: int = 100
    console_log_events_max: int = 50
    console_login_body_bytes_max: int = 4096
    # microVMs (microvm/, docs/microvm.md): the acceleration probe's boot (a KVM guest that has
    # not printed its marker by then counts as failed: TCG), a boot under emulation, what is
    # read of a guest's serial console, and the guest image's inputs.
    microvm_probe_timeout_ms: int = 15_000
    microvm_boot_timeout_ms: int = 120_000
    microvm_console_bytes_max: int = 1 * MiB
    microvm_image_input_bytes_max: int = 256 * MiB
    microvm_runtime_disk_bytes_max: int = 512 * MiB
    # The microvm backend: a VMM's cgroup holds the function's memory plus this much for QEMU
    # itself (its translation cache under TCG is capped at microvm_tcg_cache_mib); a guest gets
    # at least microvm_guest_memory_mib_min; an environment's boot to its ready frame may take
    # microvm_create_timeout_ms (a TCG boot is seconds; `up --backend microvm` gives it to the
    # frontends as their env_create_timeout_ms).
    microvm_tcg_cache_mib: int = 64
    microvm_guest_memory_mib_min: int = 128
    microvm_create_timeout_ms: int = 120_000
    # Snapshots (microvm/snapshot.py): one QMP command's answer, a paused guest's save to its
    # state file, a restore's load and the restored guest's first answer, the state file (more:
    # not made, or refused at restore and the guest boots fresh).
    microvm_qmp_timeout_ms: int = 30_000
    microvm_snapshot_save_timeout_ms: int = 120_000
    microvm_restore_timeout_ms: int = 60_000
    microvm_snapshot_bytes_max: int = 1024 * MiB
    # An agent guest restored from its snapshot (microvm/agentsnap.py): every bundle disk is
    # this size (the snapshot's guest probed one of it; a bundle over it boots fresh).
    microvm_bundle_disk_mib: int = 64
    # Guest memory sizes an agent snapshots at start (`--microvm-snapshot-memory-mib`): each is
    # a boot at start and a state file on disk; other sizes boot cold.
    microvm_snapshot_sizes_max: int = 4
    # The VMM jailer (microvm/jailer.py): the VMM's memory beyond the guest's (its cgroup's limit
    # is the guest's memory plus this; measured, docs/microvm.md) and its tasks (QEMU's threads).
    microvm_vmm_overhead_mib: int = 256  # the backend's launcher and the jailer alike
    microvm_vmm_pids_max: int = 64
    # Replicated volumes (volumes/, docs/volumes.md): a volume's size, one read or write
    # request's bytes, replicas per volume, and rewires one operation may trigger before it
    # fails (then the client waits and fences again).
    volume_size_gib_min: int = 1
    volume_size_gib_max: int = 16_384  # EC2's gp2/gp3 maximum; the EC2 API's and the client's
    volume_write_bytes_max: int = 1 * MiB
    volume_replicas: int = 3
    volume_rewire_attempts_max: int = 50
    volume_client_ops_inflight_max: int = 32  # non-overlapping operations one client sends at once
    volume_write_batch_writes_max: int = 32  # writes in one group-commit round (one fsync)
    # The FUSE process of a replicated volume (volumes/fusefile.py): its attach (read the
    # record, take it over, fence the replicas), under attach.py's 60 s wait for the mount so
    # its reason reaches the caller; its detach once unmounted
    volume_attach_timeout_ms: int = 45_000
    volume_detach_timeout_ms: int = 60_000
    # ECS managed volumes of tasks (control/ecs.py, docs/fargate.md#volumes): how often the
    # control plane looks for stopped tasks' volumes to detach and delete, and how long a
    # volume made for a task its cell never knew is kept before it is ended
    ecs_task_volume_sweep_interval_ms: int = 2_000
    ecs_task_volume_orphan_ms: int = 300_000
    # a service's managed volumes made ahead at once (CreateService/UpdateService, and each
    # volume round per service): more are made by the next rounds
    ecs_service_volumes_made_per_round_max: int = 10
    ecs_task_volume_attach_timeout_ms: int = 120_000  # the cell's wait, per volume, in task_create


DEFAULT_LIMITS = Limits()
