"""pipeline step leases: the sweeper tells a queued case from a lost one; cases record a complete history

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('task_leases',
    sa.Column('task_id', sa.String(length=80), nullable=False),
    sa.Column('case_id', sa.Uuid(), nullable=False),
    sa.Column('step', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=200), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('renewed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_task_leases_case_id_cases'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('task_id', name=op.f('pk_task_leases'))
    )
    with op.batch_alter_table('task_leases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_task_leases_case_id'), ['case_id'], unique=False)
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('history_completed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_column('history_completed_at')
    with op.batch_alter_table('task_leases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_task_leases_case_id'))
    op.drop_table('task_leases')
