-- Lethe's store as the code before migrations made it on sqlite (metadata.create_all, then the ledger's head row): frozen, never edited.
CREATE TABLE lethe_certificates (
	request_id VARCHAR(100) NOT NULL,
	subject_ref VARCHAR(64) NOT NULL,
	issued_at DATETIME NOT NULL,
	body JSON NOT NULL,
	PRIMARY KEY (request_id)
);

CREATE INDEX ix_lethe_certificates_subject_ref ON lethe_certificates (subject_ref);

CREATE TABLE lethe_forget_list (
	subject_ref VARCHAR(64) NOT NULL,
	tenant VARCHAR(100) NOT NULL,
	request_id VARCHAR(100) NOT NULL,
	systems JSON NOT NULL,
	erased_at DATETIME NOT NULL,
	sealed_subject TEXT NOT NULL,
	PRIMARY KEY (subject_ref)
);

CREATE TABLE lethe_holds (
	id VARCHAR(40) NOT NULL,
	matter VARCHAR(200) NOT NULL,
	scope VARCHAR(20) NOT NULL,
	value VARCHAR(200) NOT NULL,
	reason TEXT NOT NULL,
	placed_by VARCHAR(200) NOT NULL,
	placed_at DATETIME NOT NULL,
	released_by VARCHAR(200),
	released_at DATETIME,
	PRIMARY KEY (id)
);

CREATE TABLE lethe_ledger (
	seq INTEGER NOT NULL,
	at DATETIME NOT NULL,
	request_id VARCHAR(100) NOT NULL,
	subject_ref VARCHAR(64) NOT NULL,
	actor VARCHAR(200) NOT NULL,
	action VARCHAR(100) NOT NULL,
	system VARCHAR(100),
	details JSON NOT NULL,
	prev_hash VARCHAR(64) NOT NULL,
	hash VARCHAR(64) NOT NULL,
	idempotency_key VARCHAR(300) NOT NULL,
	PRIMARY KEY (seq),
	UNIQUE (idempotency_key)
);

CREATE INDEX ix_lethe_ledger_request_id ON lethe_ledger (request_id);

CREATE INDEX ix_lethe_ledger_subject_ref ON lethe_ledger (subject_ref);

CREATE TABLE lethe_ledger_head (
	id INTEGER NOT NULL,
	seq INTEGER NOT NULL,
	hash VARCHAR(64) NOT NULL,
	PRIMARY KEY (id)
);

INSERT INTO lethe_ledger_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
