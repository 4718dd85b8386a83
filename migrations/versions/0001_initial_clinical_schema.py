"""initial clinical schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0001'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor_type', sa.String(length=16), nullable=False),
    sa.Column('actor_id', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('entity_type', sa.String(length=32), nullable=False),
    sa.Column('entity_id', sa.String(length=64), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_entity_id'), ['entity_id'], unique=False)

    op.create_table('clinicians',
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('display_name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('totp_secret', sa.String(length=64), nullable=True),
    sa.Column('failed_logins', sa.Integer(), nullable=False),
    sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('telegram_index', sa.String(length=64), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clinicians')),
    sa.UniqueConstraint('telegram_index', name=op.f('uq_clinicians_telegram_index')),
    sa.UniqueConstraint('username', name=op.f('uq_clinicians_username'))
    )
    op.create_table('fhir_bulk_jobs',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('level', sa.String(length=16), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('progress', sa.String(length=64), nullable=True),
    sa.Column('error', sa.String(length=500), nullable=True),
    sa.Column('transaction_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fhir_bulk_jobs'))
    )
    with op.batch_alter_table('fhir_bulk_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fhir_bulk_jobs_client_id'), ['client_id'], unique=False)

    op.create_table('fhir_clients',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('jwks', sa.JSON(), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fhir_clients')),
    sa.UniqueConstraint('client_id', name=op.f('uq_fhir_clients_client_id'))
    )
    op.create_table('fhir_resources',
    sa.Column('resource_type', sa.String(length=32), nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('is_current', sa.Boolean(), nullable=False),
    sa.Column('patient_id', sa.Uuid(), nullable=True),
    sa.Column('case_id', sa.Uuid(), nullable=True),
    sa.Column('status', sa.String(length=32), nullable=True),
    sa.Column('code', sa.String(length=64), nullable=True),
    sa.Column('category', sa.String(length=64), nullable=True),
    sa.Column('identifier', sa.String(length=128), nullable=True),
    sa.Column('effective_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('issued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_updated', sa.DateTime(timezone=True), nullable=False),
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('data_enc', sa.LargeBinary(), nullable=True),
    sa.Column('data', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('resource_type', 'id', 'version_id', name=op.f('pk_fhir_resources'))
    )
    with op.batch_alter_table('fhir_resources', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fhir_resources_case_id'), ['case_id'], unique=False)
        batch_op.create_index('ix_fhir_resources_patient', ['patient_id', 'resource_type'], unique=False)
        batch_op.create_index('ix_fhir_resources_search', ['resource_type', 'is_current', 'last_updated'], unique=False)
        batch_op.create_index(batch_op.f('ix_fhir_resources_seq'), ['seq'], unique=False)

    op.create_table('fhir_subscriptions',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('criteria', sa.String(length=500), nullable=False),
    sa.Column('endpoint', sa.String(length=500), nullable=False),
    sa.Column('headers', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error_count', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('resource', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fhir_subscriptions'))
    )
    with op.batch_alter_table('fhir_subscriptions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fhir_subscriptions_client_id'), ['client_id'], unique=False)

    op.create_table('fhir_used_jti',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('jti', sa.String(length=255), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('client_id', 'jti', name=op.f('pk_fhir_used_jti'))
    )
    with op.batch_alter_table('fhir_used_jti', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fhir_used_jti_expires_at'), ['expires_at'], unique=False)

    op.create_table('kv',
    sa.Column('namespace', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('value_enc', sa.LargeBinary(), nullable=True),
    sa.Column('value', sa.JSON(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('namespace', 'key', name=op.f('pk_kv'))
    )
    op.create_table('patient_keys',
    sa.Column('patient_id', sa.Uuid(), nullable=False),
    sa.Column('wrapped_key', sa.LargeBinary(), nullable=False),
    sa.Column('master_kid', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('rotated_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('patient_id', name=op.f('pk_patient_keys'))
    )
    with op.batch_alter_table('patient_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_patient_keys_master_kid'), ['master_kid'], unique=False)

    op.create_table('patients',
    sa.Column('telegram_index', sa.String(length=64), nullable=False),
    sa.Column('telegram_id_enc', sa.LargeBinary(), nullable=False),
    sa.Column('name_enc', sa.LargeBinary(), nullable=True),
    sa.Column('language', sa.String(length=8), nullable=False),
    sa.Column('consent_version', sa.String(length=32), nullable=True),
    sa.Column('consent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('consent_withdrawn_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patients')),
    sa.UniqueConstraint('telegram_index', name=op.f('uq_patients_telegram_index'))
    )
    op.create_table('cases',
    sa.Column('patient_id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('history_enc', sa.LargeBinary(), nullable=True),
    sa.Column('urgency', sa.String(length=16), nullable=False),
    sa.Column('condition_code', sa.String(length=32), nullable=True),
    sa.Column('failure_reason', sa.String(length=200), nullable=True),
    sa.Column('pipeline_attempts', sa.Integer(), nullable=False),
    sa.Column('report_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_cases_patient_id_patients'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cases'))
    )
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cases_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index('ix_cases_status_updated', ['status', 'status_changed_at'], unique=False)

    op.create_table('fhir_bulk_files',
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('resource_type', sa.String(length=32), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('data_enc', sa.LargeBinary(), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['fhir_bulk_jobs.id'], name=op.f('fk_fhir_bulk_files_job_id_fhir_bulk_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fhir_bulk_files'))
    )
    with op.batch_alter_table('fhir_bulk_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_fhir_bulk_files_job_id'), ['job_id'], unique=False)

    op.create_table('fhir_subscription_notifications',
    sa.Column('subscription_id', sa.Uuid(), nullable=False),
    sa.Column('resource_ref', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['subscription_id'], ['fhir_subscriptions.id'], name=op.f('fk_fhir_subscription_notifications_subscription_id_fhir_subscriptions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fhir_subscription_notifications'))
    )
    with op.batch_alter_table('fhir_subscription_notifications', schema=None) as batch_op:
        batch_op.create_index('ix_fhir_sub_notif_due', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_fhir_subscription_notifications_subscription_id'), ['subscription_id'], unique=False)

    op.create_table('outbox',
    sa.Column('patient_id', sa.Uuid(), nullable=False),
    sa.Column('case_id', sa.Uuid(), nullable=True),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('dedup_key', sa.String(length=128), nullable=False),
    sa.Column('payload_enc', sa.LargeBinary(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_outbox_patient_id_patients'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox')),
    sa.UniqueConstraint('dedup_key', name=op.f('uq_outbox_dedup_key'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index('ix_outbox_pending', ['status', 'next_attempt_at'], unique=False)

    op.create_table('ai_results',
    sa.Column('case_id', sa.Uuid(), nullable=False),
    sa.Column('engine', sa.String(length=32), nullable=False),
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('weights_sha256', sa.String(length=64), nullable=False),
    sa.Column('differential_enc', sa.LargeBinary(), nullable=False),
    sa.Column('description_enc', sa.LargeBinary(), nullable=True),
    sa.Column('saliency_enc', sa.LargeBinary(), nullable=True),
    sa.Column('top_condition_code', sa.String(length=32), nullable=True),
    sa.Column('top_probability', sa.Float(), nullable=True),
    sa.Column('flags', sa.JSON(), nullable=False),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_ai_results_case_id_cases'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ai_results')),
    sa.UniqueConstraint('case_id', 'engine', name=op.f('uq_ai_results_case_id_engine'))
    )
    with op.batch_alter_table('ai_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ai_results_case_id'), ['case_id'], unique=False)

    op.create_table('case_messages',
    sa.Column('case_id', sa.Uuid(), nullable=False),
    sa.Column('patient_id', sa.Uuid(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('text_enc', sa.LargeBinary(), nullable=False),
    sa.Column('flags', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_case_messages_case_id_cases'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_case_messages'))
    )
    with op.batch_alter_table('case_messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_case_messages_case_id'), ['case_id'], unique=False)

    op.create_table('explanation_images',
    sa.Column('case_id', sa.Uuid(), nullable=False),
    sa.Column('patient_id', sa.Uuid(), nullable=False),
    sa.Column('condition_code', sa.String(length=32), nullable=False),
    sa.Column('data_enc', sa.LargeBinary(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('mime', sa.String(length=32), nullable=False),
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_explanation_images_case_id_cases'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_explanation_images')),
    sa.UniqueConstraint('case_id', 'condition_code', 'seed', name=op.f('uq_explanation_images_case_id_condition_code_seed'))
    )
    with op.batch_alter_table('explanation_images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_explanation_images_case_id'), ['case_id'], unique=False)

    op.create_table('images',
    sa.Column('case_id', sa.Uuid(), nullable=False),
    sa.Column('patient_id', sa.Uuid(), nullable=False),
    sa.Column('data_enc', sa.LargeBinary(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('mime', sa.String(length=32), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('quality', sa.JSON(), nullable=True),
    sa.Column('source_ref', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_images_case_id_cases'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('source_ref', name=op.f('uq_images_source_ref'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_case_id'), ['case_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_patient_id'), ['patient_id'], unique=False)

    op.create_table('review_tasks',
    sa.Column('case_id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('urgency', sa.String(length=16), nullable=False),
    sa.Column('reasons', sa.JSON(), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_by', sa.Uuid(), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('claim_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decision', sa.String(length=16), nullable=True),
    sa.Column('decision_condition_code', sa.String(length=32), nullable=True),
    sa.Column('decision_urgency', sa.String(length=16), nullable=True),
    sa.Column('recommendation', sa.String(length=64), nullable=True),
    sa.Column('note_enc', sa.LargeBinary(), nullable=True),
    sa.Column('decided_by', sa.Uuid(), nullable=True),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_review_tasks_case_id_cases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['claimed_by'], ['clinicians.id'], name=op.f('fk_review_tasks_claimed_by_clinicians')),
    sa.ForeignKeyConstraint(['decided_by'], ['clinicians.id'], name=op.f('fk_review_tasks_decided_by_clinicians')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_review_tasks'))
    )
    with op.batch_alter_table('review_tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_review_tasks_case_id'), ['case_id'], unique=False)
        batch_op.create_index('ix_review_tasks_queue', ['status', 'priority', 'due_at'], unique=False)

    # The audit trail is append-only in the database too, not only in the ORM.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION skinbridge_audit_append_only() RETURNS trigger AS $$ "
            "BEGIN RAISE EXCEPTION 'audit_events is append-only'; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION skinbridge_audit_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS skinbridge_audit_append_only()")
    with op.batch_alter_table('review_tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_review_tasks_queue')
        batch_op.drop_index(batch_op.f('ix_review_tasks_case_id'))

    op.drop_table('review_tasks')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_patient_id'))
        batch_op.drop_index(batch_op.f('ix_images_case_id'))

    op.drop_table('images')
    with op.batch_alter_table('explanation_images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_explanation_images_case_id'))

    op.drop_table('explanation_images')
    with op.batch_alter_table('case_messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_case_messages_case_id'))

    op.drop_table('case_messages')
    with op.batch_alter_table('ai_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ai_results_case_id'))

    op.drop_table('ai_results')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_pending')
        batch_op.drop_index(batch_op.f('ix_outbox_patient_id'))

    op.drop_table('outbox')
    with op.batch_alter_table('fhir_subscription_notifications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fhir_subscription_notifications_subscription_id'))
        batch_op.drop_index('ix_fhir_sub_notif_due')

    op.drop_table('fhir_subscription_notifications')
    with op.batch_alter_table('fhir_bulk_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fhir_bulk_files_job_id'))

    op.drop_table('fhir_bulk_files')
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_index('ix_cases_status_updated')
        batch_op.drop_index(batch_op.f('ix_cases_patient_id'))

    op.drop_table('cases')
    op.drop_table('patients')
    with op.batch_alter_table('patient_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_patient_keys_master_kid'))

    op.drop_table('patient_keys')
    op.drop_table('kv')
    with op.batch_alter_table('fhir_used_jti', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fhir_used_jti_expires_at'))

    op.drop_table('fhir_used_jti')
    with op.batch_alter_table('fhir_subscriptions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fhir_subscriptions_client_id'))

    op.drop_table('fhir_subscriptions')
    with op.batch_alter_table('fhir_resources', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fhir_resources_seq'))
        batch_op.drop_index('ix_fhir_resources_search')
        batch_op.drop_index('ix_fhir_resources_patient')
        batch_op.drop_index(batch_op.f('ix_fhir_resources_case_id'))

    op.drop_table('fhir_resources')
    op.drop_table('fhir_clients')
    with op.batch_alter_table('fhir_bulk_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fhir_bulk_jobs_client_id'))

    op.drop_table('fhir_bulk_jobs')
    op.drop_table('clinicians')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_entity_id'))
        batch_op.drop_index(batch_op.f('ix_audit_events_at'))

    op.drop_table('audit_events')
