"""explainer reviews: a dermatologist's per-condition sign-off of the explanation pictures

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('explainer_reviews',
    sa.Column('explainer_id', sa.String(length=200), nullable=False),
    sa.Column('weights_sha256', sa.String(length=64), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('approved', sa.JSON(), nullable=False),
    sa.Column('rejected', sa.JSON(), nullable=False),
    sa.Column('reviewer_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.ForeignKeyConstraint(['reviewer_id'], ['clinicians.id'], name=op.f('fk_explainer_reviews_reviewer_id_clinicians')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_explainer_reviews'))
    )
    with op.batch_alter_table('explainer_reviews', schema=None) as batch_op:
        batch_op.create_index('ix_explainer_reviews_weights', ['weights_sha256', 'created_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('explainer_reviews', schema=None) as batch_op:
        batch_op.drop_index('ix_explainer_reviews_weights')

    op.drop_table('explainer_reviews')
