"""FHIR API at scale: an index for each search parameter and for the snapshot's version probe

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Shared state of several API processes needs no new table: the SMART jti replay cache
(fhir_used_jti, now keyed by the jti's SHA-256), export jobs and console sessions already live in
the database.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

INDEXES = {
    'ix_fhir_resources_versions': ['resource_type', 'id', 'seq'],
    'ix_fhir_resources_type_seq': ['resource_type', 'seq'],
    'ix_fhir_resources_status': ['resource_type', 'status', 'seq'],
    'ix_fhir_resources_code': ['resource_type', 'code'],
    'ix_fhir_resources_category': ['resource_type', 'category'],
    'ix_fhir_resources_identifier': ['resource_type', 'identifier'],
    'ix_fhir_resources_effective': ['resource_type', 'effective_at'],
    'ix_fhir_resources_issued': ['resource_type', 'issued_at'],
    'ix_fhir_resources_updated': ['resource_type', 'last_updated'],
}


def upgrade() -> None:
    with op.batch_alter_table('fhir_resources', schema=None) as batch_op:
        for name, columns in INDEXES.items():
            batch_op.create_index(name, columns, unique=False)


def downgrade() -> None:
    with op.batch_alter_table('fhir_resources', schema=None) as batch_op:
        for name in INDEXES:
            batch_op.drop_index(name)
