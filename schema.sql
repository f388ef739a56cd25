-- Generated from taskomatic/schema.py by `taskomatic db schema`; do not edit.

-- Schema version 6.

CREATE DOMAIN task_state AS VARCHAR(16) CONSTRAINT task_state_valid CHECK (VALUE IN ('new', 'running', 'waiting', 'complete', 'failed', 'cancelled'));

CREATE DOMAIN task_count AS INTEGER CONSTRAINT task_count_nonnegative CHECK (VALUE >= 0);

CREATE DOMAIN task_max_attempts AS INTEGER CONSTRAINT task_max_attempts_positive CHECK (VALUE >= 1);

CREATE SEQUENCE tasks_seq;

CREATE TABLE api_tokens (
	id TEXT NOT NULL, 
	name TEXT NOT NULL, 
	role TEXT NOT NULL, 
	salt TEXT NOT NULL, 
	hash TEXT NOT NULL, 
	scrypt_n INTEGER NOT NULL, 
	created_by TEXT, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	revoked_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id), 
	CONSTRAINT api_tokens_role CHECK (role IN ('viewer', 'operator', 'admin'))
);

CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;

CREATE TABLE dispatchers (
	id UUID NOT NULL, 
	hostname TEXT NOT NULL, 
	pid INTEGER NOT NULL, 
	workers INTEGER NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	heartbeat_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	stopped_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id)
);

CREATE TABLE hosts (
	name TEXT NOT NULL, 
	uri TEXT NOT NULL, 
	state TEXT NOT NULL, 
	capacity INTEGER, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	changed_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (name), 
	CONSTRAINT hosts_state CHECK (state IN ('active', 'maintenance')), 
	CONSTRAINT hosts_capacity CHECK (capacity IS NULL OR capacity >= 0), 
	UNIQUE (uri)
);

CREATE TABLE schema_version (
	version INTEGER NOT NULL, 
	applied_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (version)
);

CREATE TABLE task_groups (
	id UUID NOT NULL, 
	name TEXT, 
	created_by TEXT, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	on_failure TEXT, 
	PRIMARY KEY (id)
);

CREATE TABLE host_inventory (
	host TEXT NOT NULL, 
	reachable BOOLEAN NOT NULL, 
	since TIMESTAMP WITH TIME ZONE NOT NULL, 
	error TEXT, 
	hostname TEXT, 
	libvirt_version TEXT, 
	hypervisor TEXT, 
	cpus INTEGER, 
	memory_kib BIGINT, 
	free_memory_kib BIGINT, 
	confirmed_at TIMESTAMP WITH TIME ZONE, 
	synced_at TIMESTAMP WITH TIME ZONE, 
	valid_until TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (host), 
	FOREIGN KEY(host) REFERENCES hosts (name) ON DELETE CASCADE
);

CREATE TABLE pool_inventory (
	host TEXT NOT NULL, 
	name TEXT NOT NULL, 
	uuid TEXT NOT NULL, 
	state TEXT NOT NULL, 
	persistent BOOLEAN NOT NULL, 
	autostart BOOLEAN NOT NULL, 
	capacity BIGINT, 
	allocation BIGINT, 
	available BIGINT, 
	confirmed_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (host, name), 
	FOREIGN KEY(host) REFERENCES hosts (name) ON DELETE CASCADE
);

CREATE TABLE tasks (
	id UUID NOT NULL, 
	seq BIGINT NOT NULL, 
	action TEXT NOT NULL, 
	params JSONB NOT NULL, 
	state task_state NOT NULL, 
	priority INTEGER NOT NULL, 
	not_before TIMESTAMP WITH TIME ZONE NOT NULL, 
	timeout FLOAT, 
	max_attempts task_max_attempts NOT NULL, 
	attempt task_count NOT NULL, 
	locks JSONB NOT NULL, 
	group_id UUID, 
	result JSONB, 
	error JSONB, 
	created_by TEXT, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE, 
	finished_at TIMESTAMP WITH TIME ZONE, 
	owner UUID, 
	lease_until TIMESTAMP WITH TIME ZONE, 
	deadline TIMESTAMP WITH TIME ZONE, 
	pending task_count NOT NULL, 
	collected_at TIMESTAMP WITH TIME ZONE, 
	job JSONB, 
	stop_request JSONB, 
	compensates UUID, 
	PRIMARY KEY (id), 
	UNIQUE (seq), 
	FOREIGN KEY(group_id) REFERENCES task_groups (id)
);

CREATE INDEX tasks_group ON tasks (group_id) WHERE group_id IS NOT NULL;

CREATE INDEX tasks_leased ON tasks (lease_until) WHERE state IN ('running', 'waiting');

CREATE INDEX tasks_ready ON tasks (priority DESC, seq) WHERE state = 'new' AND pending = 0;

CREATE INDEX tasks_scheduled ON tasks (not_before) WHERE state = 'new' AND pending = 0 AND priority IS NOT NULL;

CREATE INDEX tasks_state_seq ON tasks (state, seq);

CREATE TABLE vm_inventory (
	host TEXT NOT NULL, 
	uuid TEXT NOT NULL, 
	name TEXT NOT NULL, 
	state TEXT NOT NULL, 
	reason TEXT, 
	since TIMESTAMP WITH TIME ZONE NOT NULL, 
	persistent BOOLEAN NOT NULL, 
	vcpus INTEGER, 
	memory_kib BIGINT, 
	max_memory_kib BIGINT, 
	disks JSONB NOT NULL, 
	snapshots JSONB NOT NULL, 
	confirmed_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (host, uuid), 
	FOREIGN KEY(host) REFERENCES hosts (name) ON DELETE CASCADE
);

CREATE INDEX vm_inventory_name ON vm_inventory (name);

CREATE TABLE held_locks (
	key TEXT NOT NULL, 
	task_id UUID NOT NULL, 
	since TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (key), 
	FOREIGN KEY(task_id) REFERENCES tasks (id)
);

CREATE INDEX held_locks_task ON held_locks (task_id);

CREATE TABLE task_events (
	id BIGSERIAL NOT NULL, 
	task_id UUID NOT NULL, 
	from_state VARCHAR(16), 
	to_state VARCHAR(16) NOT NULL, 
	at TIMESTAMP WITH TIME ZONE NOT NULL, 
	actor TEXT NOT NULL, 
	message TEXT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(task_id) REFERENCES tasks (id)
);

CREATE INDEX task_events_task ON task_events (task_id, id);

CREATE TABLE task_locks (
	task_id UUID NOT NULL, 
	key TEXT NOT NULL, 
	PRIMARY KEY (task_id, key), 
	FOREIGN KEY(task_id) REFERENCES tasks (id)
);

CREATE TABLE task_prerequisites (
	task_id UUID NOT NULL, 
	prerequisite_id UUID NOT NULL, 
	PRIMARY KEY (task_id, prerequisite_id), 
	CONSTRAINT task_prerequisites_no_self_edge CHECK (task_id <> prerequisite_id), 
	FOREIGN KEY(task_id) REFERENCES tasks (id), 
	FOREIGN KEY(prerequisite_id) REFERENCES tasks (id)
);

CREATE INDEX task_prerequisites_dependents ON task_prerequisites (prerequisite_id);

CREATE TABLE volume_inventory (
	host TEXT NOT NULL, 
	pool TEXT NOT NULL, 
	name TEXT NOT NULL, 
	path TEXT, 
	kind TEXT, 
	capacity BIGINT, 
	allocation BIGINT, 
	confirmed_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (host, pool, name), 
	FOREIGN KEY(host, pool) REFERENCES pool_inventory (host, name) ON DELETE CASCADE
);
