-- The key store as the code before migrations made it on postgresql (metadata.create_all): frozen, never edited.
CREATE TABLE lethe_codec_keys (
	key_id VARCHAR(64) NOT NULL,
	material BYTEA,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	retired_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (key_id)
);

CREATE TABLE lethe_data_keys (
	subject_ref VARCHAR(32) NOT NULL,
	version INTEGER NOT NULL,
	tenant VARCHAR(100) NOT NULL,
	kek_version INTEGER NOT NULL,
	wrapped BYTEA NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	encryptions BIGINT NOT NULL,
	PRIMARY KEY (subject_ref, version)
);

CREATE TABLE lethe_kek_state (
	id INTEGER NOT NULL,
	min_decrypt_version INTEGER NOT NULL,
	PRIMARY KEY (id)
);

CREATE TABLE lethe_kek_versions (
	version INTEGER NOT NULL,
	material BYTEA,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	retired_at TIMESTAMP WITH TIME ZONE,
	rotation_id VARCHAR(100),
	PRIMARY KEY (version),
	UNIQUE (rotation_id)
);

CREATE TABLE lethe_shredded_subjects (
	subject_ref VARCHAR(32) NOT NULL,
	tenant VARCHAR(100) NOT NULL,
	shredded_at TIMESTAMP WITH TIME ZONE NOT NULL,
	request_id VARCHAR(100) NOT NULL,
	versions_destroyed INTEGER NOT NULL,
	PRIMARY KEY (subject_ref)
);
